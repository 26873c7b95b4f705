"""backup --dry-run: the figures the backup would have, and nothing written."""
from __future__ import annotations

import io
import json
import os

import crashkit
from chunkvault import Repository
from chunkvault.remotes.local import LocalRemote

PASSWORD = crashkit.PASSWORD
FIGURES = ("new_files", "changed_files", "unchanged_files", "deleted", "files", "dirs", "bytes", "read_bytes",
           "added_blobs", "added_raw_bytes", "added_stored_bytes", "delta_blobs", "delta_stored_bytes",
           "whole_stored_bytes", "manifest_records", "chain_length")


class NoWrites(LocalRemote):
    """A repository a dry run must leave as it is: any write fails the test."""

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        raise AssertionError(f"a dry run wrote {key}")

    def delete(self, key: str) -> None:
        raise AssertionError(f"a dry run deleted {key}")


def figures(snap) -> dict:
    return {k: snap.stats[k] for k in FIGURES} | {"kind": snap.kind, "parent": snap.parent}


def test_a_dry_run_counts_what_the_backup_then_stores_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    page = os.urandom(1 << 16)
    (src / "db").write_bytes(page * 6)
    (src / "d" / "small").write_bytes(b"small file")
    (src / "d" / "gone").write_bytes(b"to be deleted")
    path = str(tmp_path / "repo")
    Repository.init(path, PASSWORD, kdf_seconds=0, ledger=False).close()
    opts = {"fixed_chunks": ["db"], "fixed_chunk_size": 1 << 16}
    deltas = []
    for step in range(3):
        if step == 1:
            with open(src / "db", "r+b") as f:  # a delta against the parent's chunk
                f.seek(2 * (1 << 16) + 5)
                f.write(b"in place")
            (src / "d" / "gone").unlink()
            (src / "d" / "new").write_bytes(os.urandom(5000))
        if step == 2:
            (src / "d" / "small").write_bytes(b"changed small file")
        with Repository.open(NoWrites(path), PASSWORD, ledger=False) as repo:
            dry = repo.backup([str(src)], dry_run=True, **opts).snapshot
        assert dry.id == ""
        with Repository.open(path, PASSWORD, ledger=False) as repo:
            assert len(repo.snapshots()) == step
            real = repo.backup([str(src)], **opts).snapshot
        assert figures(dry) == figures(real)
        deltas.append(real.stats["delta_blobs"])
    assert deltas == [0, 1, 0] and dry.stats["changed_files"] == 1
    with Repository.open(NoWrites(path), PASSWORD, ledger=False) as repo:
        dry = repo.backup_stream(io.BytesIO(page * 2), "dump.sql", dry_run=True).snapshot
    assert (dry.stats["new_files"], dry.stats["added_blobs"] >= 1) == (1, True)


def test_the_cli_dry_run_says_so_and_leaves_the_repository_as_it_was(tmp_path):
    repo = str(tmp_path / "repo")
    crashkit.init_repo(repo)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(3000))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "repo").rglob("*"))
    out = crashkit.run_cli("backup", "-r", repo, str(src), "--dry-run").stdout.decode().splitlines()
    assert out[0] == "dry run: would save a full snapshot" and out[2].startswith("  would add: ")
    info = json.loads(crashkit.run_cli("backup", "-r", repo, str(src), "-n", "--json").stdout)
    assert info["dry_run"] is True and info["id"] is None and info["stats"]["new_files"] == 1
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "repo").rglob("*")) == before
