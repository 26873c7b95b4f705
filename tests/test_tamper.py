"""Tampering: every object type damaged, swapped or replayed is detected, never decoded into wrong data.

Each damaged copy of a small repository is opened, checked with --read-data
and restored in full (crashkit.probe): a restore either fails with the
library's error naming the object or gives exactly the recorded bytes.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest

import crashkit
from chunkvault import Repository
from chunkvault.errors import CorruptObject, MissingObject, WrongPassword
from chunkvault.ledger import RepositoryStateWarning

FLIPS = int(os.environ.get("CHUNKVAULT_TAMPER_FLIPS", "6"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("tamper"))
    path, states = crashkit.build_tamper_repo(work)
    return work, path, states


def _config_span(path: str, field: str) -> range:
    """Byte positions of one clear JSON value in the config."""
    data = open(os.path.join(path, "config"), "rb").read()
    value = json.loads(data)[field].encode()
    start = data.index(b'"%s": "' % field.encode()) + len(field) + 5
    assert data[start : start + len(value)] == value
    return range(start, start + len(value))


def _allowed(path: str, kind: str, how: str, outcome: str) -> bool:
    """Every damage is detected by name, except in the config's clear fields (documented):
    ``created`` is informational and unauthenticated, a damaged ``id`` reads as a wrong password."""
    if outcome == "detected":
        return True
    if kind != "config" or not how.startswith("bit "):
        return False
    pos = int(how.split()[4])
    span = {"harmless": "created", "misreported": "id"}[outcome]
    return pos in _config_span(path, span)


@pytest.mark.parametrize("kind", crashkit.OBJECT_KINDS)
def test_damaged_objects_are_detected_by_name(pristine, kind):
    work, path, states = pristine
    fig = crashkit.TamperFigures()
    for key, how, damage in list(crashkit.mutations(path, kind, random.Random(kind), FLIPS)):
        t = crashkit.tamper_one(path, states, work, kind, key, how, damage)
        fig.add(t)
        assert _allowed(path, kind, how, t.outcome), f"{key} {how}: {t.outcome}: {t.messages}"
        if kind == "pack-header":  # restores read blobs by range and never need the header ...
            assert not any(m.startswith("restore") for m in t.messages), t.messages
            assert any(m.startswith("check") for m in t.messages)  # ... but check reads it
    print(fig.summary())
    assert fig.made >= FLIPS and fig.wrong_data == 0


def test_replayed_and_rolled_back_snapshot_sets_are_detected_by_the_client_that_made_them(pristine):
    work, path, states = pristine
    fig = crashkit.TamperFigures()
    for key, how, damage in list(crashkit.mutations(path, "snapshot-set", random.Random(0), FLIPS)):
        t = crashkit.tamper_one(path, states, work, "snapshot-set", key, how, damage)
        fig.add(t)
        assert t.outcome == "detected", f"{key} {how}: {t.messages}"
        assert any(m.startswith(f"check: {key}: ") for m in t.messages), t.messages
        assert any(m.startswith("warning: ") for m in t.messages), t.messages
    print(fig.summary())
    assert fig.made == 2 and fig.detected == 2


def _copy(pristine, tmp_path) -> str:
    _, path, _ = pristine
    work = str(tmp_path / "repo")
    shutil.copytree(path, work)
    return work


def test_damaged_pack_fails_restore_naming_a_blob_and_cli_says_one_line(pristine, tmp_path):
    _, _, states = pristine
    work = _copy(pristine, tmp_path)
    sid = list(states)[-1]
    with crashkit.open_repo(work) as repo:
        needed = sorted(crashkit.tree_blobs(repo.store, repo.snapshot(sid)))
        loc = repo.store.locate(needed[0])  # damage a blob this snapshot needs
        pack = repo.store.pack_ids[loc.pack_no].hex()
    key = f"data/{pack[:2]}/{pack}"
    names = crashkit.identifiers(work, key)
    with open(os.path.join(work, key), "r+b") as f:
        at = loc.offset + min(40, loc.length - 1)
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))
    with crashkit.open_repo(work) as repo, pytest.raises(CorruptObject) as info:
        repo.restore(sid, str(tmp_path / "out"))
    assert any(n in info.value.object_name for n in names)
    proc = crashkit.run_cli("restore", "-r", work, sid, "--target", str(tmp_path / "cli-out"), ok=(13,))
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and any(n in err for n in names), err


def test_check_reports_a_corrupt_index_instead_of_raising(pristine, tmp_path):
    work = _copy(pristine, tmp_path)
    name = sorted(os.listdir(os.path.join(work, "index")))[0]
    with open(os.path.join(work, "index", name), "ab") as f:
        f.write(b"x")
    with crashkit.open_repo(work) as repo:
        report = repo.check()
    assert f"index/{name}" in [p.object for p in report.problems]


def test_config_id_flip_names_the_config(pristine, tmp_path):
    work = _copy(pristine, tmp_path)
    cfg = json.loads(open(os.path.join(work, "config"), "rb").read())
    cfg["id"] = ("0" if cfg["id"][0] != "0" else "1") + cfg["id"][1:]
    with open(os.path.join(work, "config"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CorruptObject) as info:
        crashkit.open_repo(work)
    assert info.value.object_name == "config"


def test_config_created_field_is_not_authenticated_but_harmless(pristine, tmp_path):
    """Outcome documented: `created` is informational clear text; changing it changes nothing else."""
    _, _, states = pristine
    work = _copy(pristine, tmp_path)
    cfg = json.loads(open(os.path.join(work, "config"), "rb").read())
    cfg["created"] = "1999-01-01T00:00:00+00:00"
    with open(os.path.join(work, "config"), "w") as f:
        json.dump(cfg, f)
    assert crashkit.probe(work, states, str(tmp_path)) == []


def test_config_from_another_repository_is_refused(pristine, tmp_path):
    work = _copy(pristine, tmp_path)
    other = str(tmp_path / "other")
    crashkit.init_repo(other)
    shutil.copy(os.path.join(other, "config"), os.path.join(work, "config"))
    with pytest.raises((WrongPassword, CorruptObject)):
        crashkit.open_repo(work)


def test_key_from_another_repository_under_this_keys_name(pristine, tmp_path):
    work = _copy(pristine, tmp_path)
    other = str(tmp_path / "other")
    crashkit.init_repo(other)  # same password
    mine = os.listdir(os.path.join(work, "keys"))[0]
    theirs = os.listdir(os.path.join(other, "keys"))[0]
    shutil.copy(os.path.join(other, "keys", theirs), os.path.join(work, "keys", mine))
    with pytest.raises(CorruptObject) as info:
        crashkit.open_repo(work)
    assert info.value.object_name == f"keys/{mine}"
    # moved under its own name it is a well-formed key, but of another repository: named as such
    os.remove(os.path.join(work, "keys", mine))
    shutil.copy(os.path.join(other, "keys", theirs), os.path.join(work, "keys", theirs))
    with pytest.raises(CorruptObject) as info:
        crashkit.open_repo(work)
    assert "another repository" in str(info.value)


def test_one_damaged_key_of_two_is_reported_and_the_other_opens(pristine, tmp_path):
    _, _, states = pristine
    work = _copy(pristine, tmp_path)
    with crashkit.open_repo(work) as repo:
        added = repo.add_key("second password", kdf_seconds=0)
    first = [k for k in os.listdir(os.path.join(work, "keys")) if k != added][0]
    with open(os.path.join(work, "keys", first), "ab") as f:
        f.write(b" ")
    with Repository.open(work, "second password") as repo:
        report = repo.check()
    assert [p.object for p in report.problems] == [f"keys/{first}"]


# --- replayed snapshots -------------------------------------------------------------------------


@pytest.fixture
def chain(tmp_path):
    """full A, differentials B (of A) and C (of B); the objects' bytes kept before any change."""
    path = str(tmp_path / "repo")
    crashkit.init_repo(path, compression=3)
    tree = crashkit.SourceTree(str(tmp_path / "src"), random.Random(4), target_bytes=1 << 20)
    states, raw = {}, {}
    with crashkit.open_repo(path) as repo:
        for _ in range(3):
            sid = repo.backup([tree.root]).snapshot.id
            states[sid] = tree.state()
            tree.mutate()
    for sid in states:
        raw[sid] = open(os.path.join(path, "snapshots", sid), "rb").read()
    return path, states, raw


def test_older_snapshot_bytes_under_a_newer_name_are_rejected(chain):
    path, states, raw = chain
    a, _, c = list(states)
    with open(os.path.join(path, "snapshots", c), "wb") as f:
        f.write(raw[a])
    with crashkit.open_repo(path) as repo:
        with pytest.warns(RepositoryStateWarning, match=f"snapshot {c[:8]} is unreadable"):
            assert c not in [s.id for s in repo.snapshots()]
        assert c in repo.store.unreadable_snapshots[c].object_name


def test_readded_forgotten_snapshot_before_prune_is_detected_as_replayed(chain, tmp_path):
    """A forgotten snapshot put back under its own name is a valid, authentic object: the client
    that forgot it says so (its ledger); reads warn and still restore exactly."""
    path, states, raw = chain
    a, b, c = list(states)
    with crashkit.open_repo(path) as repo:
        repo.forget([c])
    crashkit.put_snapshot_back(path, c, raw)
    with crashkit.open_repo(path) as repo:
        report = repo.check(read_data=True)
        assert [(p.object, p.snapshots) for p in report.problems] == [(f"snapshots/{c}", [c])]
        assert "replayed" in report.problems[0].problem
    with pytest.warns(RepositoryStateWarning, match="replayed"):
        crashkit.verify_restores(path, states, str(tmp_path), crashkit.Figures("replay"))


def test_another_client_cannot_tell_a_replay_or_a_rollback(chain, tmp_path):
    """Outcome documented: the snapshot set is not signed, so a client without this one's ledger
    sees a clean repository; every snapshot present still restores exactly."""
    path, states, raw = chain
    a, b, c = list(states)
    with crashkit.open_repo(path) as repo:
        repo.forget([b])
    crashkit.put_snapshot_back(path, b, raw)
    os.remove(os.path.join(path, "snapshots", c))
    with Repository.open(path, crashkit.PASSWORD, ledger=False) as repo:
        assert repo.check(read_data=True).ok
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", str(tmp_path / "another-client"))
        crashkit.check_clean(path, crashkit.Figures("replay"))
        crashkit.verify_restores(path, {a: states[a], b: states[b]}, str(tmp_path), crashkit.Figures("replay"))


def test_readded_forgotten_snapshot_after_prune_fails_loudly(chain, tmp_path):
    path, states, raw = chain
    a, b, c = list(states)
    with crashkit.open_repo(path) as repo:
        repo.forget([c])
        repo.prune(max_unused=0)
    crashkit.put_snapshot_back(path, c, raw)
    with crashkit.open_repo(path) as repo:
        report = repo.check()
        assert not report.ok and any(c in p.snapshots for p in report.problems)
        assert any(p.object == f"snapshots/{c}" and "replayed" in p.problem for p in report.problems)
        with pytest.warns(RepositoryStateWarning, match="replayed"), pytest.raises(CorruptObject):
            repo.restore(c, str(tmp_path / "c"))  # MissingObject is a CorruptObject
    with pytest.warns(RepositoryStateWarning, match="replayed"):
        crashkit.verify_restores(path, {a: states[a], b: states[b]}, str(tmp_path), crashkit.Figures("replay"))


def test_pre_rebase_version_of_a_snapshot_replayed(chain, tmp_path):
    """Forgetting B rewrites C (same id) onto A.  Putting C's old bytes back makes C name
    B again, which is gone: reported naming B, never resolved against the wrong parent."""
    path, states, raw = chain
    a, b, c = list(states)
    with crashkit.open_repo(path) as repo:
        repo.forget([b])
        assert repo.snapshot(c).parent == a
    crashkit.verify_restores(path, {a: states[a], c: states[c]}, str(tmp_path), crashkit.Figures("replay"))
    crashkit.put_snapshot_back(path, c, raw)
    with crashkit.open_repo(path) as repo:
        with pytest.raises(MissingObject) as info:
            repo.restore(c, str(tmp_path / "c"))
        assert b in info.value.object_name
        report = repo.check()
        assert any(c in p.object and b in p.problem for p in report.problems)
    crashkit.verify_restores(path, {a: states[a]}, str(tmp_path), crashkit.Figures("replay"))


@pytest.mark.parametrize("deleted", [1, 2])
def test_deleted_newest_snapshots_are_detected_as_a_rollback(chain, tmp_path, deleted):
    """Removing the newest snapshots rolls the repository back: the client that saw the newest
    reports it by id; the others still restore exactly."""
    path, states, _ = chain
    ids = list(states)
    for sid in ids[-deleted:]:
        os.remove(os.path.join(path, "snapshots", sid))
        states.pop(sid)
    with crashkit.open_repo(path) as repo:
        report = repo.check()
    assert [p.object for p in report.problems] == [f"snapshots/{ids[-1]}"]
    assert "rolled back" in report.problems[0].problem
    with pytest.warns(RepositoryStateWarning, match="rolled back"):
        crashkit.verify_restores(path, states, str(tmp_path), crashkit.Figures("rollback"))


# Exported `.backup` files: flips, truncations, swapped and spliced sections are in tests/test_export.py.


def test_json_nested_past_the_parser_s_depth_is_damage_not_a_crash(pristine, tmp_path):
    """Whoever writes the storage can plant JSON nested 30,000 deep: a lock object of it is not a lock
    (every backup, check and prune stopped with RecursionError), a config or key file of it is damaged."""
    import blake3

    deep = b"[" * 30_000 + b"]" * 30_000  # within the 64 KiB read of a lock or key file, far past the depth
    work = _copy(pristine, tmp_path)
    os.makedirs(os.path.join(work, "locks"), exist_ok=True)
    with open(os.path.join(work, "locks", "0" * 32), "wb") as f:
        f.write(deep)
    with crashkit.open_repo(work, ledger=False) as repo:
        assert repo.check().ok
        repo.prune()
    with open(os.path.join(work, "keys", blake3.blake3(deep).hexdigest()[:32]), "wb") as f:
        f.write(deep)
    assert any("keys/" in p.object and "JSON" in p.problem for p in crashkit.open_repo(work, ledger=False).check().problems)
    with open(os.path.join(work, "config"), "wb") as f:
        f.write(deep)
    with pytest.raises(CorruptObject, match="config.*not valid JSON"):
        crashkit.open_repo(work, ledger=False)


def test_a_key_planted_from_elsewhere_leaves_a_wrong_password_a_wrong_password(pristine, tmp_path):
    """Beside this repository's own key, another repository's key file: the right password still opens; a
    wrong one is a wrong password (exit 11), not a damaged config (13). One of an unknown derivation may be
    the wrong password's key (a newer chunkvault's): 17, saying both."""
    import blake3

    from chunkvault.errors import UnsupportedFormat

    work = _copy(pristine, tmp_path)
    other = str(tmp_path / "other")
    crashkit.init_repo(other)
    for name in os.listdir(os.path.join(other, "keys")):
        shutil.copy(os.path.join(other, "keys", name), os.path.join(work, "keys", name))
    with pytest.raises(WrongPassword):
        crashkit.open_repo(work, "not the password", ledger=False)
    crashkit.open_repo(work, ledger=False).close()
    unknown = json.dumps({"version": 1, "kdf": "pbkdf2"}).encode()
    with open(os.path.join(work, "keys", blake3.blake3(unknown).hexdigest()[:32]), "wb") as f:
        f.write(unknown)
    with pytest.raises(UnsupportedFormat, match="pbkdf2.*or the password is wrong"):
        crashkit.open_repo(work, "not the password", ledger=False)
    crashkit.open_repo(work, ledger=False).close()
    for name in os.listdir(os.path.join(work, "keys")):  # only keys of elsewhere left: that is damage
        if name not in os.listdir(os.path.join(other, "keys")):
            os.remove(os.path.join(work, "keys", name))
    with pytest.raises((CorruptObject, UnsupportedFormat)):
        crashkit.open_repo(work, "not the password", ledger=False)


def test_this_repository_s_cheapest_keys_are_tried_first(tmp_path, new_repo, derivations, password):
    """Key files copied in from other repositories (each a derivation to pay for, up to a minute for one
    planted with the largest cost) are tried after this repository's own."""
    repo = new_repo(str(tmp_path / "repo"))
    for i in range(8):
        other = new_repo(str(tmp_path / f"other{i}"))
        for name in os.listdir(tmp_path / f"other{i}" / "keys"):
            shutil.copy(tmp_path / f"other{i}" / "keys" / name, tmp_path / "repo" / "keys" / name)
        other.close()
    derivations.clear()
    Repository.open(str(tmp_path / "repo"), password, ledger=False).close()
    assert len(derivations) == 1
    repo.close()
