"""Damaged repositories give a clear error naming the object, never wrong data."""
import os
import random

import pytest

from chunkvault import Repository
from chunkvault.errors import CorruptObject, MissingObject, WrongPassword
from chunkvault.ledger import RepositoryStateWarning


@pytest.fixture
def backed_up(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(2_000_000))
    (src / "small").write_bytes(b"small file")
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    return tmp_path / "repo", snap


def objects(repo_dir, prefix):
    root = repo_dir / prefix
    return sorted(p for p in root.rglob("*") if p.is_file())


def flip(path, offset=None):
    data = bytearray(path.read_bytes())
    i = random.Random(1).randrange(len(data)) if offset is None else offset
    data[i] ^= 0x40
    os.chmod(path, 0o600)
    path.write_bytes(bytes(data))


def restore(repo_dir, password, target):
    repo = Repository.open(str(repo_dir), password)
    return repo.restore("latest", str(target))


def test_wrong_password(backed_up):
    repo_dir, _ = backed_up
    with pytest.raises(WrongPassword):
        Repository.open(str(repo_dir), "nope")


@pytest.mark.parametrize("offset", [0, 20, 1000, 500_000])
def test_flipped_byte_in_pack_data(backed_up, password, tmp_path, offset):
    repo_dir, _ = backed_up
    pack = max(objects(repo_dir, "data"), key=lambda p: p.stat().st_size)
    flip(pack, offset)
    with pytest.raises(CorruptObject) as info:
        restore(repo_dir, password, tmp_path / "out")
    assert info.value.object_name.startswith("blob ")


@pytest.mark.parametrize("offset", [-30, -5, -1])
def test_flipped_byte_in_pack_header(backed_up, password, tmp_path, offset):
    from chunkvault.store.pack import read_pack

    repo_dir, _ = backed_up
    pack = max(objects(repo_dir, "data"), key=lambda p: p.stat().st_size)
    flip(pack, pack.stat().st_size + offset)
    repo = Repository.open(str(repo_dir), password)
    with pytest.raises(CorruptObject) as info:
        read_pack(repo.store.sealer, pack.read_bytes(), f"data/{pack.name}")
    assert info.value.object_name == f"data/{pack.name}"
    # blobs are read by range, and the header is not needed to restore them intact
    repo.restore("latest", str(tmp_path / "out"))
    assert (tmp_path / "out" / "big").read_bytes() == (tmp_path / "src" / "big").read_bytes()


def test_flipped_byte_in_index(backed_up, password, tmp_path):
    repo_dir, _ = backed_up
    idx = objects(repo_dir, "index")[0]
    flip(idx)
    with pytest.warns(RepositoryStateWarning, match=f"index/{idx.name[:12]} does not load and is left out"), \
            pytest.raises(MissingObject, match="not in the index"):  # what only that object listed
        restore(repo_dir, password, tmp_path / "out")


def test_flipped_byte_in_snapshot(backed_up, password, tmp_path):
    repo_dir, snap = backed_up
    path = repo_dir / "snapshots" / snap.id
    flip(path)
    repo = Repository.open(str(repo_dir), password)
    with pytest.warns(RepositoryStateWarning, match=f"snapshot {snap.id[:8]} is unreadable"):
        assert repo.snapshots() == []  # left out, never used
    assert snap.id in repo.store.unreadable_snapshots[snap.id].object_name
    assert [p.snapshots for p in repo.check().problems if p.object == f"snapshots/{snap.id}"] == [[snap.id]]


def test_swapped_objects_detected(backed_up, password, tmp_path):
    repo_dir, snap = backed_up
    repo = Repository.open(str(repo_dir), password)
    (tmp_path / "src" / "more").write_bytes(b"more")
    snap2 = repo.backup([str(tmp_path / "src")]).snapshot
    a, b = repo_dir / "snapshots" / snap.id, repo_dir / "snapshots" / snap2.id
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    repo = Repository.open(str(repo_dir), password)
    with pytest.warns(RepositoryStateWarning):
        assert repo.snapshots() == []  # each is sealed to its own name: both left out
    assert sorted(repo.store.unreadable_snapshots) == sorted([snap.id, snap2.id])


def test_missing_pack(backed_up, password, tmp_path):
    repo_dir, _ = backed_up
    for p in objects(repo_dir, "data"):
        os.remove(p)
    with pytest.raises(MissingObject) as info:
        restore(repo_dir, password, tmp_path / "out")
    assert info.value.object_name.startswith("data/")


def test_truncated_pack(backed_up, password, tmp_path):
    repo_dir, _ = backed_up
    pack = max(objects(repo_dir, "data"), key=lambda p: p.stat().st_size)
    data = pack.read_bytes()
    pack.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptObject) as info:
        restore(repo_dir, password, tmp_path / "out")
    assert "truncated" in str(info.value) or "missing" in str(info.value)


def test_corrupt_config_and_key(backed_up, password):
    repo_dir, _ = backed_up
    key = objects(repo_dir, "keys")[0]
    flip(key, 5)
    with pytest.raises(CorruptObject):
        Repository.open(str(repo_dir), password)


def test_cli_reports_corruption_in_one_line_with_exit_13(backed_up, cli, tmp_path):
    repo_dir, _ = backed_up
    idx = objects(repo_dir, "index")[0]
    flip(idx)
    proc = cli("restore", "-r", str(repo_dir), "latest", "--target", str(tmp_path / "o"), check=13)
    warning, error = proc.stderr.decode().strip().splitlines()  # the object left out, then what that cost
    assert warning.startswith(f"warning: index/{idx.name[:12]} does not load and is left out")
    assert error.startswith("chunkvault: missing object blob ") and "not in the index" in error
