"""Lost and damaged packs under full and differential snapshots: what check names, what repair saves,
and how the snapshots nothing can save are forgotten.

Differentials need every manifest of their chain, and delta blobs need their bases: a lost
object takes down more than the snapshot or blob that held it, and every command must say so.
"""
import json
import os
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkvault import Repository
from chunkvault.errors import CorruptObject, MissingObject, UsageError
from chunkvault.store.retention import RetentionPolicy

from test_check import packs, repo_with_data  # noqa: F401 (a fixture)
from test_corruption import flip
from treeutil import settle
from walsegments import write_segment

MiB = 1 << 20


def pack_path(repo_dir, repo: Repository, blob_id: bytes):
    store = repo.store
    loc = store.locate(blob_id)
    return repo_dir / "data" / store.pack_ids[loc.pack_no].hex()[:2] / store.pack_ids[loc.pack_no].hex()


@pytest.fixture
def chain(tmp_path, new_repo):
    """A full and a differential of a database file (its chunks stored as deltas in the differential)
    beside a file the differential does not touch; one blob per pack."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(7)
    db = bytearray(rnd.randbytes(4 * MiB))
    (src / "db").write_bytes(db)
    (src / "notes").write_bytes(rnd.randbytes(300_000))
    repo = new_repo(str(tmp_path / "repo"), pack_size=256 * 1024)
    full = repo.backup([str(src)], fixed_chunks=["db"]).snapshot
    for at in range(1000, len(db), 64 * 1024):
        db[at : at + 16] = rnd.randbytes(16)
    (src / "db").write_bytes(db)
    diff = repo.backup([str(src)], fixed_chunks=["db"]).snapshot
    assert (full.kind, diff.kind) == ("full", "diff") and diff.stats["delta_blobs"] == 4
    return tmp_path / "repo", repo, full, diff, src


def chunk_ids(repo: Repository, snap, name: str) -> list[bytes]:
    (entry,) = [e for e in repo.tree(snap) if e.path == name.encode()]
    return list(entry.chunk_ids())


def test_lost_delta_base_is_named_and_repaired(chain, tmp_path, cli, password):
    repo_dir, repo, full, diff, src = chain
    base = chunk_ids(repo, full, "db")[0]
    delta = chunk_ids(repo, diff, "db")[0]
    assert repo.store.delta_base(delta) == base
    victim = pack_path(repo_dir, repo, base)
    assert pack_path(repo_dir, repo, delta) != victim
    manifests = {bytes.fromhex(h) for s in (full, diff) for h in s.manifest}
    assert all(pack_path(repo_dir, repo, m) != victim for m in manifests)
    os.remove(victim)

    for repaired_index in (False, True):
        if repaired_index:
            repo.repair_index()
        report = repo.check()
        files = {f for p in report.problems for f in p.files}
        assert {f"{full.id[:8]}:db", f"{diff.id[:8]}:db"} <= files, report.problems
        named = {s for p in report.problems for s in p.snapshots}
        assert named == {full.id, diff.id}
    with pytest.raises(CorruptObject, match=base.hex()):
        repo.restore(diff.id, str(tmp_path / "before"))

    dry = json.loads(cli("repair", "-r", str(repo_dir), "snapshots", "--json").stdout)
    assert {(d["snapshot"], d["path"]) for d in dry["dropped"]} == {(full.id, "db"), (diff.id, "db")}
    assert not dry["rewritten"] and not dry["unrestorable"]
    out = json.loads(cli("repair", "-r", str(repo_dir), "snapshots", "--confirm", "REPAIR", "--json").stdout)
    assert sorted(out["rewritten"]) == sorted([full.id, diff.id])

    repo = Repository.open(str(repo_dir), password)
    for snap in (full, diff):
        target = tmp_path / f"r-{snap.id[:8]}"
        repo.restore(snap.id, str(target))
        assert sorted(p.name for p in target.iterdir()) == ["notes"]
        assert (target / "notes").read_bytes() == (src / "notes").read_bytes()
    left = repo.check().problems  # the deltas on the lost base: no snapshot uses them now
    assert left and all(not p.snapshots for p in left)
    repo.prune(max_unused=0)
    assert repo.check(read_data=True).ok


@pytest.mark.parametrize("after", ["repair index"])
@pytest.mark.parametrize("kind", ["diff", "full"])
def test_a_backup_after_a_delta_base_is_lost_stores_what_it_needs_again(chain, tmp_path, password, after, kind):
    """The index still holds the deltas whose base went with a lost pack: a backup of the same data must
    not keep the file by reference to them, nor deduplicate against them, and save a snapshot nothing can
    restore while exiting 0.  It stores those chunks again."""
    repo_dir, repo, full, diff, src = chain
    base = chunk_ids(repo, full, "db")[0]
    victim = pack_path(repo_dir, repo, base)
    manifests = {bytes.fromhex(h) for s in (full, diff) for h in s.manifest}
    assert all(pack_path(repo_dir, repo, m) != victim for m in manifests)
    os.remove(victim)
    if after == "repair index":
        repo.repair_index()
    repo = Repository.open(str(repo_dir), password)
    snap = repo.backup([str(src)], fixed_chunks=["db"], kind=kind).snapshot
    assert snap.stats["added_blobs"] >= 1
    repo = Repository.open(str(repo_dir), password)  # the index as any reader loads it: the copy stored whole
    out = tmp_path / "out"
    repo.restore(snap.id, str(out))
    assert (out / "db").read_bytes() == (src / "db").read_bytes()
    report = repo.check(read_data=True)
    named = {s for p in report.problems for s in p.snapshots}
    # The differential's chunk is read from the copy stored whole now; the full's lost chunk is lost.
    assert named == {full.id}, report.problems


def test_a_chunk_of_a_delta_whose_base_is_lost_is_stored_again_whole_even_where_a_delta_would_do(
        chain, tmp_path, password):
    """The chunk comes back in another file whose parent version has readable chunks to delta against: as
    a second delta, it would sit beside the unreadable one, and a reader could take either."""
    repo_dir, repo, full, diff, src = chain
    lost = chunk_ids(repo, diff, "db")[0]
    os.remove(pack_path(repo_dir, repo, chunk_ids(repo, full, "db")[0]))
    repo.repair_index()
    repo = Repository.open(str(repo_dir), password)
    version2 = (src / "db").read_bytes()
    (src / "db").unlink()
    near = bytearray(version2)  # a version whose chunks a delta of version 2's would take few bytes against
    for at in range(5000, len(near), 64 * 1024):
        near[at : at + 8] = b"patched!"
    (src / "db2").write_bytes(near)
    repo.backup([str(src)], fixed_chunks=["db*"])
    (src / "db2").write_bytes(version2)
    snap = repo.backup([str(src)], fixed_chunks=["db*"]).snapshot
    assert lost in chunk_ids(repo, snap, "db2")
    assert snap.stats["added_blobs"] == 1 and snap.stats["delta_blobs"] == 0
    repo = Repository.open(str(repo_dir), password)
    repo.restore(snap.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "db2").read_bytes() == version2


def test_unreadable_deltas_are_those_whose_chain_misses_a_whole_blob():
    from chunkvault.store.deltabase import unreadable_deltas

    whole, delta = 1, 2
    kinds = {b"w": whole, b"d1": delta, b"d2": delta, b"x1": delta, b"x2": delta, b"dup": whole,
             b"loop1": delta, b"loop2": delta}
    bases = {b"d1": b"w", b"d2": b"d1", b"x1": b"gone", b"x2": b"x1", b"dup": b"gone", b"loop1": b"loop2",
             b"loop2": b"loop1", b"unindexed": b"w"}
    assert unreadable_deltas(bases, kinds.get, delta) == {b"x1", b"x2", b"loop1", b"loop2"}


def test_a_backup_whose_delta_base_is_damaged_stores_that_chunk_whole_and_goes_on(chain, tmp_path, password):
    """The base a changed chunk would be stored against does not read (bit rot): the chunk is at hand, so it
    is stored whole, with a warning, where the backup stopped (exit 13) until a repair."""
    repo_dir, repo, full, diff, src = chain
    damage_blob(repo_dir, repo, chunk_ids(repo, full, "db")[0])  # under the differential's delta
    db = bytearray((src / "db").read_bytes())
    db[70_000:70_016] = b"changed again..."
    (src / "db").write_bytes(db)
    repo = Repository.open(str(repo_dir), password)
    result = repo.backup([str(src)], fixed_chunks=["db"])
    assert any("is damaged" in w and "stored whole" in w for w in result.warnings), result.warnings
    repo.restore(result.snapshot.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "db").read_bytes() == bytes(db)


def test_a_delta_whose_header_names_another_base_is_named_damaged_itself(chain, tmp_path, password):
    """A bit flipped in the base id a delta's envelope carries (before it is authenticated): the error is
    the delta's, not a base one bit away from the real one that sends the user to `repair index`."""
    repo_dir, repo, full, diff, src = chain
    delta = chunk_ids(repo, diff, "db")[0]
    base = repo.store.delta_base(delta)
    loc = repo.store.locate(delta)
    with open(pack_path(repo_dir, repo, delta), "r+b") as f:
        f.seek(loc.offset + 1 + 5)  # kind, then the base id
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    repo = Repository.open(str(repo_dir), password)
    with pytest.raises(CorruptObject) as info:
        repo.restore(diff.id, str(tmp_path / "out"))
    message = str(info.value)
    assert f"blob {delta.hex()} is damaged" in message and f"the index {base.hex()}" in message, message
    assert "not in the index" not in message


def test_a_whole_blob_whose_envelope_is_a_delta_naming_itself_is_named_damaged_not_a_long_chain(chain, tmp_path,
                                                                                                 password):
    """The storage writes, over a blob the index has whole, a delta's envelope whose header names that blob as
    its base: the read is of a damaged blob, not of a chain of 17 reads of one envelope called too long."""
    repo_dir, repo, full, diff, src = chain
    whole = chunk_ids(repo, full, "db")[0]
    loc = repo.store.locate(whole)
    assert repo.store.delta_base(whole) is None and loc.length > 1 + 32 + 28
    with open(pack_path(repo_dir, repo, whole), "r+b") as f:
        f.seek(loc.offset)
        f.write(bytes([2]) + whole)  # kind delta, base: the blob itself; the rest of the envelope as it was
    repo = Repository.open(str(repo_dir), password)
    with pytest.raises(CorruptObject) as info:
        repo.store.read_blob(whole)
    message = str(info.value)
    assert f"blob {whole.hex()} is damaged" in message and "the index (none" in message, message
    assert "longer than" not in message


def test_repair_packs_goes_on_beside_a_file_no_index_lists_and_nothing_reads(small_files, cli, password):
    """A file named like a pack that is none (copied from another repository, say) blocked `repair packs`
    for good: it asked for `repair index` first, which cannot add it.  It is left where it is, and said."""
    repo_dir, repo, snap, files = small_files
    (victim,) = chunk_ids(repo, snap, "f5")
    path = pack_path(repo_dir, repo, victim)
    loc = repo.store.locate(victim)
    flip(path, loc.offset + loc.length // 2)
    foreign = repo_dir / "data" / "ee" / ("ee" * 32)
    foreign.parent.mkdir(exist_ok=True)
    foreign.write_bytes(random.Random(5).randbytes(100_000))
    cli("repair", "-r", str(repo_dir), "index")
    done = cli("repair", "-r", str(repo_dir), "packs", path.name[:12], "--confirm", "REPAIR")
    assert "1 lost" in done.stdout.decode() and not path.exists()
    assert f"data/ee/{'ee' * 32}: in no index" in done.stderr.decode() and foreign.exists()
    repo = Repository.open(str(repo_dir), password)
    assert repo.repair_snapshots(dry_run=False).dropped == [(snap.id, "f5")]
    repo.restore(snap.id, str(repo_dir.parent / "out"))
    assert {p.name for p in (repo_dir.parent / "out").iterdir()} == set(files) - {"f5"}


def test_lost_full_manifest_takes_its_differentials_down(chain, tmp_path, cli, password):
    repo_dir, repo, full, diff, _ = chain
    victim = pack_path(repo_dir, repo, bytes.fromhex(full.manifest[0]))
    assert all(pack_path(repo_dir, repo, bytes.fromhex(h)) != victim for h in diff.manifest)
    os.remove(victim)

    report = repo.check()
    assert any({full.id, diff.id} <= set(p.snapshots) for p in report.problems), report.problems
    named = f"in the manifest of snapshot {full.id}, which differential {diff.id[:8]} builds on"
    with pytest.raises(MissingObject, match=named):
        repo.restore(diff.id, str(tmp_path / "r"))
    with pytest.raises(MissingObject, match=named):
        repo.find_entry(diff.id, "notes")  # one file: read through the chain's manifests too

    listed = cli("repair", "-r", str(repo_dir), "snapshots", "--json", check=False)
    dry = json.loads(listed.stdout)
    assert [u["snapshot"] for u in dry["unrestorable"]] == [full.id, diff.id]
    assert not dry["dropped"] and not dry["rewritten"]
    repaired = cli("repair", "-r", str(repo_dir), "snapshots", "--confirm", "REPAIR", check=False)
    assert listed.returncode == repaired.returncode == 13  # what is left restores nothing: not done
    text = repaired.stdout.decode()
    assert f"cannot repair {diff.id[:8]}: it is a differential on {full.id[:8]}" in text
    assert f"chunkvault forget {full.id[:8]} {diff.id[:8]}" in text

    with pytest.raises(MissingObject, match=f"so {diff.id[:8]} cannot be rebased: forget it too"):
        repo.forget([full.id])
    assert [s.id for s in repo.snapshots()] == [full.id, diff.id]
    forgot = cli("forget", "-r", str(repo_dir), full.id[:8], check=False)
    assert forgot.returncode == 13 and forgot.stderr.decode().count("\n") == 1
    repo.forget([full.id, diff.id])
    with pytest.raises(CorruptObject, match="repair index"):
        repo.prune(max_unused=0)
    repo.repair_index()
    repo.prune(max_unused=0)
    assert repo.check(read_data=True).ok


def test_a_manifest_in_no_index_is_not_sent_to_repair_snapshots_by_repair_snapshots(chain, cli):
    """Its reason named the very command as the way on (`repair snapshots` drops the files that need it)."""
    repo_dir, repo, full, _diff, _ = chain
    os.remove(pack_path(repo_dir, repo, bytes.fromhex(full.manifest[0])))
    repo.repair_index()  # the pack dropped from the index: the manifest blob is in none now
    text = cli("repair", "-r", str(repo_dir), "snapshots", check=False).stdout.decode()
    assert f"cannot repair {full.id[:8]}: manifest blob {full.manifest[0]}: not in the index" in text
    assert "`repair snapshots` drops" not in text


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damaged_pack_check_names_what_fails_and_repair_saves_the_rest(tmp_path_factory, password, data):
    """Random full/differential series (deltas, aggregates), one random pack lost or one byte of it
    flipped: check names exactly the snapshots whose restore fails; repair saves every other snapshot
    less its named files; the rest are forgotten and the repository checks clean."""
    from chunkvault.errors import ChunkvaultError

    tmp = tmp_path_factory.mktemp("lost")
    rnd = random.Random(data.draw(st.integers(0, 2**32 - 1)))
    src = tmp / "src"
    src.mkdir()
    db = bytearray(rnd.randbytes(3 * MiB))
    repo = Repository.init(str(tmp / "repo"), password, kdf_seconds=0, pack_size=200 * 1024)
    versions: dict[str, dict[str, bytes]] = {}
    for v in range(data.draw(st.integers(2, 5))):
        for _ in range(rnd.randrange(1, 6)):
            at = rnd.randrange(len(db) - 64)
            db[at : at + 64] = rnd.randbytes(64)
        files = {"db": bytes(db), f"v{v}": rnd.randbytes(rnd.randrange(1, 120_000))}
        if v % 2:
            files["small"] = b"x" * v
        for old in src.iterdir():
            if old.name not in files:
                old.unlink()
        for name, content in files.items():
            (src / name).write_bytes(content)
        kind = data.draw(st.sampled_from(["auto", "diff", "full"]))
        snap = repo.backup([str(src)], kind=kind, fixed_chunks=["db"]).snapshot
        versions[snap.id] = files
        if data.draw(st.booleans()) and snap.kind == "diff" and v % 3 == 2:
            repo.aggregate(snap.id)
    all_packs = packs(tmp / "repo")  # pack names, so their order and sizes, differ run to run: draw shares
    victim = all_packs[data.draw(st.integers(0, 1 << 16)) % len(all_packs)]
    lose = data.draw(st.booleans())
    if lose:
        os.remove(victim)
    else:
        flip(victim, data.draw(st.integers(0, 1 << 24)) % victim.stat().st_size)

    failing = set()
    for sid in versions:
        try:
            repo.restore(sid, str(tmp / f"try-{sid[:8]}"))
        except ChunkvaultError:
            failing.add(sid)
    named = {s for p in repo.check(read_data=True).problems for s in p.snapshots}
    assert named == failing

    if lose:
        repo.repair_index()
    else:
        repo.repair_packs([victim.name], dry_run=False)
    report = repo.repair_snapshots(dry_run=False)
    lost = {s for s, _ in report.unrestorable}
    dropped = {(s, p) for s, p in report.dropped}
    assert lost <= failing and {s for s, _ in dropped} | lost == failing
    for sid, files in versions.items():
        if sid in lost:
            continue
        target = tmp / f"r-{sid[:8]}"
        repo.restore(sid, str(target))
        assert {p.name: p.read_bytes() for p in target.iterdir()} == {
            n: c for n, c in files.items() if (sid, n) not in dropped}
    if lost:
        repo.forget(sorted(lost))
    repo.prune(max_unused=0)
    assert repo.check(read_data=True).ok


@pytest.fixture
def small_files(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(3)
    files = {f"f{i}": rnd.randbytes(rnd.randrange(1000, 50_000)) for i in range(12)}
    for name, content in files.items():
        (src / name).write_bytes(content)
    settle()  # for the next backup to take them unread
    repo = new_repo(str(tmp_path / "repo"))
    return tmp_path / "repo", repo, repo.backup([str(src)]).snapshot, files


def test_flipped_byte_costs_only_its_file(small_files, tmp_path, cli, password):
    """check --read-data names the one file a flipped byte damages (the pack's other blobs verify);
    repair packs keeps every blob that verifies, then repair snapshots drops that file alone."""
    repo_dir, repo, snap, files = small_files
    (victim,) = chunk_ids(repo, snap, "f5")
    path = pack_path(repo_dir, repo, victim)
    loc = repo.store.locate(victim)
    flip(path, loc.offset + loc.length // 2)
    name = f"data/{path.parent.name}/{path.name}"
    r = repo.check(read_data=True)
    assert [p.problem for p in r.problems if p.object == name] == [
        f"content does not match its name (`repair packs {path.name[:12]}` keeps what of it still verifies)"]
    assert [f for p in r.problems for f in p.files] == [f"{snap.id[:8]}:f5"]

    dry = json.loads(cli("repair", "-r", str(repo_dir), "packs", path.name[:12], "--json").stdout)
    (salvage,) = dry["salvaged"]
    assert salvage["pack"] == name and salvage["lost"] == [victim.hex()] and salvage["salvaged"] >= len(files)
    assert path.exists()
    done = cli("repair", "-r", str(repo_dir), "packs", path.name[:12], "--confirm", "REPAIR").stdout.decode()
    assert "1 lost" in done and not path.exists()
    assert "packs replaced: `repair snapshots` lists the files that needed a lost blob" in done

    repo = Repository.open(str(repo_dir), password)
    assert {f for p in repo.check().problems for f in p.files} == {f"{snap.id[:8]}:f5"}
    assert repo.repair_snapshots(dry_run=False).dropped == [(snap.id, "f5")]
    repo.restore(snap.id, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == {
        n: c for n, c in files.items() if n != "f5"}
    assert repo.check(read_data=True).ok


def test_repair_packs_of_a_missing_pack_and_bad_arguments(small_files, cli, password):
    repo_dir, repo, snap, files = small_files
    (victim,) = chunk_ids(repo, snap, "f0")
    path = pack_path(repo_dir, repo, victim)
    for args in (["packs"], ["packs", "ffffffffff"], ["packs", path.name[:2]], ["snapshots", path.name]):
        assert cli("repair", "-r", str(repo_dir), *args, check=False).returncode == 2
    os.remove(path)
    dry = json.loads(cli("repair", "-r", str(repo_dir), "packs", path.name, "--json").stdout)
    assert dry["dry_run"] is True
    out = json.loads(cli("repair", "-r", str(repo_dir), "packs", path.name, "--confirm", "REPAIR", "--json").stdout)
    assert out["dry_run"] is False
    (salvage,) = out["salvaged"]
    assert salvage["problem"] == "pack is missing" and salvage["salvaged"] == 0 and victim.hex() in salvage["lost"]
    repo = Repository.open(str(repo_dir), password)
    report = repo.check()
    assert {s for p in report.problems for s in p.snapshots} == {snap.id}
    assert not [p for p in report.problems if p.object.startswith("data/")]  # the index forgot the pack


@pytest.mark.filterwarnings("ignore::chunkvault.ledger.RepositoryStateWarning")
def test_unreadable_snapshot_object_is_left_out_and_forgotten_with_what_builds_on_it(tmp_path, new_repo, password):
    """One damaged snapshot object does not stop the repository: listings leave it out with a warning,
    backups go on from the newest snapshot whose chain is whole, and it is forgotten by id together with
    the differentials built on it; retention and prune, which must see every snapshot, refuse until then."""
    from chunkvault.ledger import RepositoryStateWarning
    from chunkvault.store.retention import RetentionPolicy

    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"))
    made = []
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(1000))
        made.append(repo.backup([str(src)], kind="diff" if i else "full").snapshot)
    full, d1, d2 = made
    victim = tmp_path / "repo" / "snapshots" / d1.id
    flip(victim)

    repo = Repository.open(str(tmp_path / "repo"), password)
    with pytest.warns(RepositoryStateWarning, match=f"snapshot {d1.id[:8]} is unreadable"):
        assert [s.id for s in repo.snapshots()] == [full.id, d2.id]
    repo.restore(full.id, str(tmp_path / "full"))
    with pytest.raises(CorruptObject, match=f"{d1.id}.*in the chain of snapshot {d2.id}"):
        repo.restore(d2.id, str(tmp_path / "d2"))
    assert {d1.id, d2.id} <= {s for p in repo.check().problems for s in p.snapshots}

    with pytest.warns(RepositoryStateWarning):
        result = repo.backup([str(src)])
    assert result.snapshot.parent == full.id and any(d2.id[:8] in w for w in result.warnings)
    with pytest.raises(CorruptObject, match="prune needs every snapshot"):
        repo.prune()
    with pytest.raises(CorruptObject, match="retention needs every chain whole") as info:
        repo.forget(policy=RetentionPolicy(keep_last=1))
    assert f"(2 such: {' '.join(sorted([d1.id[:8], d2.id[:8]]))})" in str(info.value)
    with pytest.raises(CorruptObject, match=f"{d2.id}: a differential on {d1.id[:8]}"):
        repo.forget([d1.id[:8]])
    assert sorted(s for s, _ in repo.repair_snapshots().unrestorable) == sorted([d1.id, d2.id])

    plan = repo.forget([d1.id[:8], d2.id])
    assert sorted(plan.remove) == sorted([d1.id, d2.id]) and not plan.rebases
    assert not victim.exists() and [s.id for s in repo.snapshots()] == [full.id, result.snapshot.id]
    repo.prune(max_unused=0)
    assert repo.check(read_data=True).ok
    repo.restore(result.snapshot.id, str(tmp_path / "last"))
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["f0", "f1", "f2"]


@pytest.mark.parametrize("json_out", [False, True])
def test_forget_by_id_of_an_unreadable_snapshot_and_what_builds_on_it_reports_them(tmp_path, new_repo, cli,
                                                                                  json_out):
    """The remedy `check` and `repair snapshots` name for a snapshot object that does not load: `forget`
    deleted them, then printed its decisions by the times of the snapshots it had listed, which the damaged
    one is not among (nor a differential on it): an internal error (exit 1), dry run or not."""
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"))
    made = []
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(1000))
        made.append(repo.backup([str(src)], kind="diff" if i else "full").snapshot)
    full, d1, d2 = made
    flip(tmp_path / "repo" / "snapshots" / d1.id)
    url = str(tmp_path / "repo")
    json_args = ["--json"] if json_out else []
    for dry in (["--dry-run"], []):
        proc = cli("forget", "-r", url, *json_args, *dry, d1.id[:8], d2.id[:8])
        out = proc.stdout.decode()
        if json_out:
            times = {d["id"]: d["time"] for d in json.loads(out)["decisions"] if not d["keep"]}
            assert times == {d1.id: None, d2.id: d2.time}
        else:
            assert f"remove  {d1.id[:8]}  (unreadable)" in out and f"remove  {d2.id[:8]}  20" in out, out
    assert sorted(p.name for p in (tmp_path / "repo" / "snapshots").iterdir()) == [full.id]


def test_a_snapshot_forgotten_while_listing_is_simply_gone(repo_with_data, monkeypatch):
    from chunkvault.store.repository import Repo

    _, repo, s1, s2 = repo_with_data
    names = Repo.snapshot_names
    monkeypatch.setattr(Repo, "snapshot_names", lambda self: names(self) + ["ab" * 32])
    assert [s.id for s in repo.snapshots()] == [s1.id, s2.id] and not repo.store.unreadable_snapshots


def test_damaged_index_object_points_to_repair_index(repo_with_data, password, tmp_path):
    """A damaged index object is left out with a warning naming `repair index`: a read fails only where it
    needs what that object alone listed (naming `repair index` too), a backup stores that again, and prune
    stops; check does not advise pruning the packs it listed; after `repair index` everything works and
    nothing was lost."""
    from chunkvault.errors import RepositoryStateWarning

    repo_dir, _, s1, s2 = repo_with_data
    idx = sorted((repo_dir / "index").iterdir())[0]
    flip(idx)
    failed = 0
    for snap in (s1, s2):  # the object lists what one of them stored: that one at least does not restore
        repo = Repository.open(str(repo_dir), password)
        with pytest.warns(RepositoryStateWarning, match=f"index/{idx.name[:12]} does not load and is left out "
                                                        r"\(.*`repair index` rebuilds the index from the packs"):
            try:
                repo.restore(snap.id, str(tmp_path / f"r-{snap.id[:8]}"))
            except MissingObject as exc:
                assert "not in the index (`repair index` finds it" in str(exc)
                failed += 1
    assert failed
    with pytest.raises(CorruptObject, match=f"index/{idx.name}: .*; `repair index` rebuilds the index from the packs$"):
        repo.prune()
    report = repo.check()
    assert any(p.object == f"index/{idx.name}" for p in report.problems)
    assert report.warnings and all("prune" not in w and "repair index" in w for w in report.warnings)
    repo.repair_index()
    assert repo.check(read_data=True).ok
    for snap in (s1, s2):
        repo.restore(snap.id, str(tmp_path / f"ok-{snap.id[:8]}"))
    assert repo.backup([str(tmp_path / "src")]).snapshot.parent == s2.id


def test_an_index_object_planted_by_an_append_only_client_stops_no_restore(repo_with_data, password, tmp_path):
    """Twelve bytes uploaded as a new index object (an append-only token can, with no password) made every
    restore, listing and backup fail until `repair index`, which only a full token may run."""
    import blake3

    from chunkvault.errors import RepositoryStateWarning

    repo_dir, _, s1, s2 = repo_with_data
    junk = b"not an index"
    (repo_dir / "index" / blake3.blake3(junk).hexdigest()).write_bytes(junk)  # even named by its content
    repo = Repository.open(str(repo_dir), password)
    with pytest.warns(RepositoryStateWarning, match="does not load and is left out"):
        for snap in (s1, s2):
            repo.restore(snap.id, str(tmp_path / f"r-{snap.id[:8]}"))
        repo.backup([str(tmp_path / "src")])
    assert not repo.check().ok
    with pytest.raises(CorruptObject):
        repo.prune()  # deletes by the index: not with an object it cannot read
    repo.repair_index()
    assert repo.check(read_data=True).ok


def test_damaged_key_file_is_named_when_no_key_opens(tmp_path, new_repo, password):
    from chunkvault.errors import WrongPassword

    repo = new_repo(str(tmp_path / "repo"))
    other = repo.add_key("second password", kdf_seconds=0)
    flip(tmp_path / "repo" / "keys" / other)
    with pytest.raises(WrongPassword, match=f"or the key it opens is damaged .*keys/{other}: content does not"):
        Repository.open(str(tmp_path / "repo"), "second password")
    repo = Repository.open(str(tmp_path / "repo"), password)  # the other keys still open
    assert [p.object for p in repo.check().problems] == [f"keys/{other}"]
    assert [(k["id"], k["kdf"]) for k in repo.keys() if not k["current"]] == [(other, "damaged")]
    repo.remove_key(other[:8])
    assert repo.check().ok
    with pytest.raises(WrongPassword, match=r"^wrong password \(no key of this repository opens with it; if its key "):
        Repository.open(str(tmp_path / "repo"), "second password")


def test_copy_goes_on_past_a_snapshot_damaged_in_the_source(tmp_path, new_repo, password, cli):
    """An off-site copy copies every snapshot it can: one whose data is damaged in the source is
    reported with what builds on it, the others arrive, and a later run copies the rest once the
    source is repaired, sending nothing twice."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    repo = new_repo(str(tmp_path / "repo"))
    (src_dir / "a").write_bytes(os.urandom(100_000))
    full = repo.backup([str(src_dir)]).snapshot
    (src_dir / "b").write_bytes(os.urandom(100_000))
    d1 = repo.backup([str(src_dir)], kind="diff").snapshot
    (src_dir / "c").write_bytes(os.urandom(100_000))
    d2 = repo.backup([str(src_dir)], kind="diff").snapshot
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_bytes(os.urandom(100_000))
    separate = repo.backup([str(other)]).snapshot
    victim = chunk_ids(repo, d1, "b")[0]  # 100 kB: one or two chunks, by content
    pack = pack_path(tmp_path / "repo", repo, victim)
    good = pack.read_bytes()
    loc = repo.store.locate(victim)
    flip(pack, loc.offset + loc.length // 2)

    dst = Repository.init(str(tmp_path / "dst"), password, kdf_seconds=0, copy_chunker_from=repo)
    env = {"CHUNKVAULT_FROM_PASSWORD": password, "CHUNKVAULT_TO_PASSWORD": password}
    run = cli("copy", "-r", str(tmp_path / "repo"), "--to", str(tmp_path / "dst"), "--json", env=env, check=False)
    assert run.returncode == 13
    out = json.loads(run.stdout)
    assert {c["source"] for c in out["copied"]} == {full.id, separate.id}
    failed = {f["source"]: f["reason"] for f in out["failed"]}
    assert victim.hex() in failed[d1.id] and failed[d2.id] == f"its parent {d1.id} was not copied"
    assert run.stderr.decode().splitlines()[-1] == (
        "chunkvault: corrupt object in the source repository: 2 snapshot(s) not copied: damaged there "
        "(`check` there names what; the others were copied)")

    pack.write_bytes(good)
    again = repo.copy_to(dst)
    assert [s for s, _ in again.copied] == [d1.id, d2.id] and not again.failed
    assert sorted(again.skipped) == sorted([full.id, separate.id])
    copied = {s.stats["copied_from"]: s for s in dst.snapshots()}
    dst.restore(copied[d2.id].id, str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b", "c"]


def test_a_backup_after_a_repair_reads_again_the_files_whose_data_it_lost(small_files, tmp_path):
    """The source is intact and unchanged, but the parent's record of f5 names a blob the repair dropped:
    the next backup reads f5 again and stores it, instead of recording it by reference to nothing (which
    heals the earlier snapshot too: its blob id is the same)."""
    repo_dir, repo, snap, files = small_files
    (victim,) = chunk_ids(repo, snap, "f5")
    path = pack_path(repo_dir, repo, victim)
    loc = repo.store.locate(victim)
    flip(path, loc.offset + loc.length // 2)
    repo.repair_packs([path.name], dry_run=False)
    after = repo.backup([str(tmp_path / "src")]).snapshot
    assert after.kind == "diff" and after.stats["read_bytes"] == len(files["f5"])
    assert after.stats["added_stored_bytes"] > 0
    repo.restore(after, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == files
    assert repo.check(read_data=True).ok


def test_repair_snapshots_says_a_backup_first_saves_what_the_source_still_holds(small_files, tmp_path, cli):
    """Told only to add --confirm REPAIR, a user dropped f5 from every snapshot for good, where a backup
    of the unchanged source first stored its data again and made them whole.  The dry run says so, and
    after that backup it has nothing left to drop."""
    repo_dir, repo, snap, files = small_files
    (victim,) = chunk_ids(repo, snap, "f5")
    path = pack_path(repo_dir, repo, victim)
    loc = repo.store.locate(victim)
    flip(path, loc.offset + loc.length // 2)
    cli("repair", "-r", str(repo_dir), "packs", path.name[:12], "--confirm", "REPAIR")
    dry = cli("repair", "-r", str(repo_dir), "snapshots").stdout.decode()
    assert f"would drop {snap.id[:8]}:f5" in dry
    assert "a backup of the same source first stores again the data of the files it still holds" in dry, dry
    cli("backup", "-r", str(repo_dir), str(tmp_path / "src"))
    assert "would drop" not in cli("repair", "-r", str(repo_dir), "snapshots").stdout.decode()
    cli("restore", "-r", str(repo_dir), snap.id, "-t", str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == files


def damage_blob(repo_dir, repo: Repository, blob_id: bytes) -> None:
    loc = repo.store.locate(blob_id)
    flip(pack_path(repo_dir, repo, blob_id), loc.offset + loc.length // 2)


@pytest.mark.parametrize("processes", [1, 2])
def test_restore_writes_every_file_it_can_and_names_the_damaged_ones(tmp_path, new_repo, password, monkeypatch,
                                                                     processes):
    """A damaged chunk costs the file it belongs to, not the restore: every other file is written exactly
    (those after a damaged chunk of a many-chunk file too), the damaged files are not left half-written,
    and the error at the end names them.  With worker processes, a large file written in parts by
    several of them is removed when one part is damaged."""
    from chunkvault.store import restore_workers

    monkeypatch.setattr(restore_workers, "STRIPE_BYTES", 1 << 20)
    monkeypatch.setattr(restore_workers, "SPLIT_SHARE", 1 << 40)  # every file over a stripe in parts
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(5)
    files = {f"f{i}": rnd.randbytes(60_000) for i in range(8)}
    files["big"] = rnd.randbytes(4 << 20)  # 16 chunks of 256 KiB, in parts across the workers
    files["mid"] = rnd.randbytes(2 << 20)  # its damaged chunk is followed by others, then by f5..f7
    for name, content in files.items():
        (src / name).write_bytes(content)
    repo = new_repo(str(tmp_path / "repo"), pack_size=256 * 1024)
    snap = repo.backup([str(src)], fixed_chunks=["big", "mid"], fixed_chunk_size=256 * 1024).snapshot
    assert repo.restore(snap.id, str(tmp_path / "clean"), processes=processes).processes == processes
    for name, index in (("f3", 0), ("big", 9), ("mid", 2)):
        damage_blob(tmp_path / "repo", repo, chunk_ids(repo, snap, name)[index])

    repo = Repository.open(str(tmp_path / "repo"), password)
    with pytest.raises(CorruptObject, match=r"3 file\(s\) not restored: .*\(everything else was restored\)") as info:
        repo.restore(snap.id, str(tmp_path / "out"), processes=processes)
    for name in ("big", "f3", "mid"):
        assert name in str(info.value)
    out = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert out == {n: c for n, c in files.items() if n not in ("f3", "big", "mid")}


@pytest.mark.parametrize("damage", ["lost", "lost, then repair index", "flipped"])
def test_backups_go_on_when_the_parents_manifest_is_damaged(chain, tmp_path, password, damage):
    """The newest snapshot's chain needs a manifest that is damaged: the next backup does not build on it
    but makes a full snapshot (there is no intact parent), with a warning.  While the index still lists
    a lost pack, the backup stops instead, pointing to `repair index`: it would deduplicate against blobs
    that are gone."""
    repo_dir, repo, full, diff, src = chain
    manifest = bytes.fromhex(full.manifest[0])
    if damage == "flipped":
        damage_blob(repo_dir, repo, manifest)
    else:
        os.remove(pack_path(repo_dir, repo, manifest))
    repo = Repository.open(str(repo_dir), password)
    if damage == "lost":
        with pytest.raises(MissingObject, match=f"`repair index` drops it from the index\\) \\(in the manifest of "
                                                f"snapshot {full.id}, which differential {diff.id[:8]} builds on\\)"):
            repo.backup([str(src)], fixed_chunks=["db"])
        return
    if damage == "lost, then repair index":
        repo.repair_index()
    result = repo.backup([str(src)], fixed_chunks=["db"])
    assert result.snapshot.kind == "full" and result.snapshot.parent is None
    assert any(f"snapshot {diff.id[:8]} cannot be read in full" in w for w in result.warnings)
    repo.restore(result.snapshot.id, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == {
        p.name: p.read_bytes() for p in src.iterdir()}


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_backup_that_would_make_the_damaged_manifest_again_stops(chain, tmp_path, password, cli, damage):
    """The newest snapshot's manifest is damaged; the backup builds on the one before, finds the same
    changes, and so makes the same manifest blob: deduplicated against the damaged copy, its snapshot
    would not restore, night after night, each run exiting 0.  It stops instead, pointing to the repair."""
    repo_dir, repo, full, diff, src = chain
    manifest = bytes.fromhex(diff.manifest[0])
    if damage == "flipped":
        damage_blob(repo_dir, repo, manifest)
    else:
        pack = pack_path(repo_dir, repo, manifest)
        os.truncate(pack, 100)
    before = sorted(p.name for p in (repo_dir / "snapshots").iterdir())
    result = cli("backup", "-r", str(repo_dir), str(src), "--fixed-chunks", "db", password=password, check=13)
    err = result.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and manifest.hex() in err and "repair packs" in err, err
    assert sorted(p.name for p in (repo_dir / "snapshots").iterdir()) == before


def test_a_backup_that_found_a_pack_damaged_does_not_refer_to_its_other_blobs(tmp_path, new_repo, password):
    """The newest pack holds a file's chunk and the newest manifest, and is zeroed: the backup builds on the
    snapshot before, and would take that file's chunk from the damaged pack (exit 0, a snapshot that does
    not restore).  It stops, pointing to the repair; after the repair a backup stores the chunk again."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(200_000))
    repo_dir = tmp_path / "repo"
    repo = new_repo(str(repo_dir))
    repo.backup([str(src)])
    (src / "g.bin").write_bytes(os.urandom(200_000))
    snap = repo.backup([str(src)]).snapshot
    pack = pack_path(repo_dir, repo, chunk_ids(repo, snap, "g.bin")[0])
    assert pack == pack_path(repo_dir, repo, bytes.fromhex(snap.manifest[0]))
    pack.write_bytes(bytes(pack.stat().st_size))
    os.utime(src / "g.bin")
    repo = Repository.open(str(repo_dir), password)
    before = repo.snapshots()
    with pytest.raises(CorruptObject, match=f"{pack.name}: is damaged .*nor does blob .*repair packs"):
        repo.backup([str(src)])
    assert [s.id for s in repo.snapshots()] == [s.id for s in before]
    repo.repair_packs([pack.name], dry_run=False)
    repo = Repository.open(str(repo_dir), password)
    repo.backup([str(src)])
    repo.restore("latest", str(tmp_path / "out"))
    assert (tmp_path / "out" / "g.bin").read_bytes() == (src / "g.bin").read_bytes()


@pytest.mark.parametrize("name", ["junk", "nested/index/" + "a" * 64, "config"])
def test_objects_under_index_not_named_as_one_stop_nothing(tmp_path, new_repo, name):
    """A stray file, another repository nested below, or what an append-only client planted: each stopped
    every backup as a damaged index object, and `repair index` (the fix the message named) crashed."""
    path = tmp_path / "repo"
    repo = new_repo(str(path))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    repo.backup([str(src)])
    planted = path / "index" / name
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"not an index")
    with Repository.open(str(path), "correct horse battery staple") as again:
        (src / "g").write_bytes(b"more")
        again.backup([str(src)])
        assert again.check(read_data=True).ok
        again.repair_index()
        assert again.check(read_data=True).ok and len(again.snapshots()) == 2
    assert planted.read_bytes() == b"not an index"  # not ours to delete


def test_repair_index_keeps_the_entries_of_a_pack_whose_header_alone_is_damaged(small_files, tmp_path):
    """The old index is the only record of where such a pack's blobs sit: `repair index` keeps it (and says
    so), every file still restores, and `repair packs` then salvages every blob into a pack that reads."""
    repo_dir, repo, snap, files = small_files
    (pid,) = repo.store.stored_packs()
    path = repo_dir / "data" / pid.hex()[:2] / pid.hex()
    flip(path, path.stat().st_size - 40)  # inside the sealed header at the pack's end
    assert not repo.check().ok
    report = repo.repair_index()
    assert len(report.kept_packs) == 1 and not report.unreadable_packs and "authentic" in report.kept_packs[0]
    repo.restore(snap, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == files
    salvage = repo.repair_packs([pid.hex()], dry_run=False)
    assert [(p.salvaged, p.lost) for p in salvage.salvaged] == [(report.blobs, [])]  # the files' and the tree's
    assert repo.check(read_data=True).ok
    repo.restore(snap, str(tmp_path / "again"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "again").iterdir()} == files


def test_a_trailer_whose_header_length_leaves_no_room_for_itself_is_a_damaged_pack(small_files, tmp_path):
    """A header length that fits the pack but not with the trailer after it (``header_len <= size <
    header_len + 8``) is a damaged header: check names the pack and `repair index` keeps the old index's
    entries, where a header read from before the pack's start would be an internal error."""
    import struct

    repo_dir, repo, snap, files = small_files
    (pid,) = repo.store.stored_packs()
    path = repo_dir / "data" / pid.hex()[:2] / pid.hex()
    size = path.stat().st_size
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.seek(size - 8)
        f.write(struct.pack("<I", size - 4))
    problems = repo.check().problems
    assert problems and all(pid.hex() in p.object for p in problems)
    report = repo.repair_index()
    assert len(report.kept_packs) == 1 and "header length exceeds pack size" in report.kept_packs[0]
    repo.restore(snap, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == files


def test_repair_packs_refuses_while_packs_no_index_lists_may_hold_delta_bases(chain, tmp_path):
    """An index object lost: the deltas' bases are in packs no index lists, not gone. check says to run
    `repair index` first; `repair packs` refuses (it would drop those deltas with their packs for good);
    `repair index` alone restores everything."""
    repo_dir, repo, full, diff, src = chain
    base_packs = {repo.store.pack_ids[repo.store.locate(c).pack_no] for c in chunk_ids(repo, full, "db")}
    (lost,) = [n for n in repo.store.index_names() if base_packs & set(repo.store.read_index_object(n).packs)]
    delta_pack = repo.store.pack_ids[repo.store.locate(chunk_ids(repo, diff, "db")[0]).pack_no]
    os.unlink(repo_dir / "index" / lost)
    reopened = Repository.open(str(repo_dir), "correct horse battery staple")
    problems = [p.problem for p in reopened.check().problems if "delta base" in p.problem]
    assert problems and all("`repair index` first" in p and "repair packs" not in p for p in problems)
    stored_before = sorted(os.listdir(repo_dir / "data"))
    with pytest.raises(UsageError, match="no index.*`repair index` first"):
        reopened.repair_packs([delta_pack.hex()], dry_run=False)
    assert sorted(os.listdir(repo_dir / "data")) == stored_before
    reopened.repair_index()
    reopened.restore(diff, str(tmp_path / "out"))
    assert (tmp_path / "out" / "db").read_bytes() == (src / "db").read_bytes()
    assert reopened.check(read_data=True).ok
    reopened.close()


def test_repair_snapshots_drops_the_hard_links_to_a_file_it_drops(tmp_path, new_repo):
    """A hard link left to a dropped file restores to nothing and fails every verify-restore: it goes with
    it, from a full and (as a deletion) from a differential."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(11)
    (src / "a").write_bytes(rnd.randbytes(256 * 1024))
    os.link(src / "a", src / "b")
    (src / "c").write_bytes(rnd.randbytes(256 * 1024))
    repo = new_repo(str(tmp_path / "repo"), pack_size=16 * 1024)  # a chunk per pack: every chunk is larger
    every = {"fixed_chunks": ["*"], "fixed_chunk_size": 64 * 1024}
    full = repo.backup([str(src)], **every).snapshot
    with open(src / "a", "r+b") as f:  # b, the same inode, changes with it
        f.write(rnd.randbytes(256 * 1024))
    diff = repo.backup([str(src)], **every).snapshot
    assert diff.kind == "diff"
    for c in chunk_ids(repo, full, "a") + chunk_ids(repo, diff, "a"):
        os.unlink(pack_path(tmp_path / "repo", repo, c))
    repo.repair_index()
    report = repo.repair_snapshots(dry_run=False)
    assert sorted(report.dropped) == sorted([(full.id, "a"), (full.id, "b"), (diff.id, "a"), (diff.id, "b")])
    for snap in (repo.snapshot(full.id), repo.snapshot(diff.id)):
        assert sorted(e.path for e in repo.tree(snap)) == [b"", b"c"]
        restored = repo.restore(snap, str(tmp_path / snap.id))
        assert os.listdir(tmp_path / snap.id) == ["c"] and not restored.warnings
    assert repo.check(read_data=True).ok


def test_a_damaged_index_object_another_supersedes_stops_nothing(repo_with_data, password, tmp_path):
    """A repair (or prune) killed after writing its new index and before deleting the old objects leaves
    them; one of those damaged lists nothing live: reads, backups, prune and check go on (check warns),
    and `repair index` deletes it."""
    repo_dir, repo, s1, s2 = repo_with_data
    old = {p.name: p.read_bytes() for p in (repo_dir / "index").iterdir()}
    repo.repair_index()
    name = sorted(old)[0]
    (repo_dir / "index" / name).write_bytes(old[name])
    flip(repo_dir / "index" / name)
    repo = Repository.open(str(repo_dir), password)
    repo.restore(s2.id, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["a", "b", "c"]
    assert repo.backup([str(tmp_path / "src")]).snapshot.parent == s2.id
    report = repo.check()
    assert report.ok and any(f"index/{name} is superseded" in w for w in report.warnings)
    repo.prune()
    repo.repair_index()
    assert name not in os.listdir(repo_dir / "index")
    assert repo.check(read_data=True).ok


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["together", "one at a time"])
def test_repair_packs_salvages_two_packs_whose_files_were_swapped(tmp_path, new_repo, password, one_at_a_time):
    """Each file holds the other pack's blobs, every one intact, with its own header saying where: check
    names both packs and the files they take down, and `repair packs` of both (as it advises) keeps every
    blob (it lost them all, and deleted both files).  Repaired one at a time, the first took the index's
    word that the other pack held its intact blobs, and deleted their only copies: the other pack, whose
    header says otherwise, is now salvaged in the same run."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(9)
    for i in range(3):
        (src / f"f{i}").write_bytes(rnd.randbytes(900_000))
    repo = new_repo(str(tmp_path / "repo"), pack_size=1_000_000)
    snap = repo.backup([str(src)]).snapshot
    # two packs of the files' data (the smallest holds the snapshot's manifest, which names no file)
    a, b = sorted((p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()), key=os.path.getsize)[-2:]
    swapped_a, swapped_b = b.read_bytes(), a.read_bytes()
    a.write_bytes(swapped_a)
    b.write_bytes(swapped_b)
    repo = Repository.open(str(tmp_path / "repo"), password)
    for read_data in (False, True):
        problems = repo.check(read_data=read_data).problems
        assert {f"data/{a.parent.name}/{a.name}", f"data/{b.parent.name}/{b.name}"} <= {p.object for p in problems}
        assert {"f0", "f1", "f2"} & {f.split(":", 1)[1] for p in problems for f in p.files}
    report = repo.repair_packs([a.name] if one_at_a_time else [a.name, b.name], dry_run=False)
    assert all(not p.lost for p in report.salvaged) and sum(p.salvaged for p in report.salvaged) > 0
    assert {p.pack for p in report.salvaged} == {f"data/{a.parent.name}/{a.name}", f"data/{b.parent.name}/{b.name}"}
    assert repo.check(read_data=True).ok
    repo.restore(snap.id, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == \
        {p.name: p.read_bytes() for p in src.iterdir()}


def test_repair_snapshots_with_a_lost_index_object_points_to_repair_index_not_to_forget(tmp_path, new_repo, cli):
    """Every pack there, one index object gone: the snapshots it indexed were called beyond repair, and the
    advised forget and prune then deleted the pack that `repair index` would have indexed again."""
    path = tmp_path / "repo"
    repo = new_repo(str(path))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("one\n")
    repo.backup([str(src)])
    first = set(os.listdir(path / "index"))
    (src / "b").write_bytes(os.urandom(100_000))
    repo.backup([str(src)])
    for name in set(os.listdir(path / "index")) - first:
        os.unlink(path / "index" / name)
    for args in (["repair", "snapshots"], ["repair", "snapshots", "--confirm", "REPAIR"]):
        r = cli(*args, "-r", str(path), check=2)
        assert "in no index" in r.stderr.decode() and "`repair index` first" in r.stderr.decode()
    cli("repair", "index", "-r", str(path))
    out = tmp_path / "out"
    cli("restore", "latest", "-r", str(path), "--target", str(out))
    assert (out / "b").read_bytes() == (src / "b").read_bytes()


def test_check_counts_the_files_a_problem_takes_down_beyond_those_it_names(tmp_path, new_repo, cli):
    """A lost pack of many small files: check named the first 20 (100 in JSON) and said nothing of the rest."""
    path = tmp_path / "repo"
    repo = new_repo(str(path))
    src = tmp_path / "src"
    src.mkdir()
    same = os.urandom(2000)
    for i in range(130):  # one chunk: losing it takes every file down
        (src / f"f{i:03}").write_bytes(same)
    repo.backup([str(src)])
    (first,) = [p for p in (path / "data").rglob("*") if p.is_file()]
    (src / "other").write_text("x")
    repo.backup([str(src)], kind="full")  # its manifest in another pack: its files are what is named
    first.unlink()
    doc = json.loads(cli("check", "-r", str(path), "--json", check=18).stdout)
    (lost,) = [p for p in doc["problems"] if p["files"]]
    assert len(lost["files"]) == 100 and lost["more_files"] == 30
    text = cli("check", "-r", str(path), check=18).stdout.decode()
    assert text.count("  affects file ") == 20 and "  and 110 more files (--json names 100)" in text


def test_a_backup_after_every_index_object_is_lost_names_repair_index(chain, password):
    """Its parent unreadable (no index lists its manifest), it made a full and stored everything again, and
    its warning pointed to the snapshots alone."""
    repo_dir, repo, full, diff, src = chain
    for name in os.listdir(repo_dir / "index"):
        os.unlink(repo_dir / "index" / name)
    repo = Repository.open(str(repo_dir), password)
    warnings = repo.backup([str(src)], fixed_chunks=["db"]).warnings
    assert any("in no index" in w and "`repair index` finds what they hold" in w for w in warnings), warnings
    repo.repair_index()
    assert repo.check().ok


def _a_file_under_a_full_and_its_differential_in_one_pack(tmp_path, new_repo):
    """(repository, full, differential on it, the pack file): file a's chunk lies only in the pack of a
    backup before them (whose manifest goes with it), so deleting that pack takes a from both."""
    path = tmp_path / "repo"
    repo = new_repo(str(path))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    (src / "b").write_text("one\n")
    repo.backup([str(src)])
    (first,) = [p for p in (path / "data").rglob("*") if p.is_file()]
    (src / "b").write_text("two\n")
    full = repo.backup([str(src)], kind="full").snapshot  # a's chunk deduplicates into the first pack
    (src / "b").write_text("three\n")
    diff = repo.backup([str(src)], kind="diff").snapshot
    assert diff.parent == full.id
    return repo, full, diff, first


@pytest.mark.parametrize("dry_run", [True, False])
def test_repair_snapshots_names_the_files_a_differential_loses_with_its_parents(tmp_path, new_repo, dry_run):
    """A differential restores the files it inherits from its parent: those its parent loses, it loses too,
    and its restore then lacked them unnamed."""
    repo, full, diff, first = _a_file_under_a_full_and_its_differential_in_one_pack(tmp_path, new_repo)
    first.unlink()
    repo.repair_index()
    report = repo.repair_snapshots(dry_run=dry_run)
    assert sorted((s, p) for s, p in report.dropped) == sorted([(full.id, "a"), (diff.id, "a")])


def test_a_file_a_differential_loses_does_not_come_back_as_its_parent_s_older_version(tmp_path, new_repo):
    """Dropped from the differential, its path must be deleted there: the restore otherwise gave the full's
    version of the file, without a word, as if it were the differential's."""
    import random

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(1).randbytes(200_000))
    (src / "b").write_bytes(b"keep\n")
    repo = new_repo(str(tmp_path / "repo"), pack_size=1)  # a pack per blob: the manifests' apart
    repo.backup([str(src)], kind="full")
    before = {p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()}
    (src / "a").write_bytes(random.Random(2).randbytes(2_000_000))
    diff = repo.backup([str(src)], kind="diff").snapshot
    new_packs = {p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()} - before
    max(new_packs, key=lambda p: p.stat().st_size).unlink()  # a chunk of the version of a the differential stored
    repo.repair_index()
    assert (diff.id, "a") in repo.repair_snapshots(dry_run=False).dropped
    repo.restore(diff.id, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["b"]


def test_repair_snapshots_counts_what_each_snapshot_still_holds(tmp_path, new_repo):
    """The listing and `--type auto` read a snapshot's counts: after a repair they still gave the files it
    dropped, so nothing looked lost, in the snapshot that lost them or in a differential inheriting them."""
    repo, full, diff, first = _a_file_under_a_full_and_its_differential_in_one_pack(tmp_path, new_repo)
    assert (full.stats["files"], full.stats["bytes"]) == (2, 300_004)
    first.unlink()
    repo.repair_index()
    repo.repair_snapshots(dry_run=False)
    for snap, left in ((full, (1, 4)), (diff, (1, 6))):  # b alone: "two\n", "three\n"
        again = repo.snapshot(snap.id)
        assert (again.stats["files"], again.stats["bytes"]) == left, snap.kind
    repo.forget([s.id for s in repo.snapshots() if s.id not in (full.id, diff.id)])
    assert repo.check(read_data=True).ok


def test_a_pack_copied_under_another_name_or_into_another_folder_is_not_taken_for_a_pack(small_files, tmp_path):
    """A sync tool's or a hand's copy of a pack: `check` passed it over or advised `repair index`, which
    indexed a copy whose name is not its content's (every `check --read-data` failed after), or counted a
    copy in another folder as the pack itself, that nothing ever named."""
    path, repo, snap, files = small_files
    (pack,) = [p for p in (path / "data").rglob("*") if p.is_file()]
    renamed = path / "data" / "ab" / ("ab" + "c" * 62)
    renamed.parent.mkdir(exist_ok=True)  # the pack's own folder, one time in 256
    renamed.write_bytes(pack.read_bytes())
    other, another = [f for f in ("00", "11", "22") if f != pack.parent.name][:2]  # not the pack's own folder
    elsewhere = path / "data" / other / pack.name
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(pack.read_bytes())
    empty = path / "data" / another / (another[0] * 64)
    empty.parent.mkdir()
    empty.write_bytes(b"")
    report = repo.check()
    assert report.ok
    said = "\n".join(report.warnings)
    assert f"unexpected object data/{other}/{pack.name} (no pack is kept under that name)" in said
    assert f"data/{another}/{another[0] * 64} is in no index and too short to be a pack (0 bytes)" in said
    repaired = repo.repair_index()
    assert repaired.packs == 1
    assert any(u.startswith(f"data/ab/{renamed.name}: its content does not match its name")
               for u in repaired.unreadable_packs), repaired.unreadable_packs
    assert any(u.startswith(f"data/{other}/{pack.name}: not a pack") for u in repaired.unreadable_packs)
    assert repo.check(read_data=True).ok
    repo.prune()
    assert not renamed.exists() and not empty.exists() and elsewhere.exists()  # not ours to delete
    repo.restore(snap.id, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("read_data", [False, True])
def test_check_says_a_pack_copied_under_another_name_is_a_copy_not_a_pack_for_repair_index(small_files, read_data):
    """`check` advised `repair index` for it ("a backup running now, or one interrupted ... `repair index` adds
    it"), which leaves such a copy out of the index and says so."""
    path, repo, snap, files = small_files
    (pack,) = [p for p in (path / "data").rglob("*") if p.is_file()]
    renamed = path / "data" / "ab" / ("ab" + "c" * 62)
    renamed.parent.mkdir(exist_ok=True)
    renamed.write_bytes(pack.read_bytes())
    report = repo.check(read_data=read_data)
    assert report.ok
    said = [w for w in report.warnings if renamed.name in w]
    assert said == [f"data/ab/{renamed.name} is in no index, and its content does not match its name (a copy of "
                    "another pack under a new name?): nothing needs it; prune deletes it"], report.warnings
    assert any("its content does not match its name" in u for u in repo.repair_index().unreadable_packs)
    repo.prune()
    assert not renamed.exists() and pack.exists()


@pytest.mark.parametrize("where", ["snapshots", "keys", "locks", "index", "data", "data/ab", ""])
@pytest.mark.parametrize("name", [".DS_Store", "notes~", "a b"])
def test_a_file_whose_name_no_object_has_is_left_alone(small_files, tmp_path, cli, where, name):
    """A desktop's .DS_Store, an editor's backup: listed, such a name stopped every command (exit 2, "invalid
    object key"), restore and check included."""
    path, repo, snap, files = small_files
    stray = path / where / name
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"x")
    with Repository.open(str(path), "correct horse battery staple") as again:
        assert [s.id for s in again.snapshots()] == [snap.id]
        again.restore(snap.id, str(tmp_path / "out"))
        assert again.check(read_data=True).ok
        again.backup([str(tmp_path / "src")])
        again.forget([snap.id])
        again.prune()
    assert stray.read_bytes() == b"x"


@pytest.mark.parametrize("name", ["desktop.ini", "Thumbs.db", "upper-case-id"])
def test_a_file_under_snapshots_that_no_snapshot_id_names_is_left_alone(small_files, tmp_path, name):
    """A name a key may have but no snapshot (a snapshot id is 64 lowercase hex digits): taken for a damaged
    snapshot, it stopped every prune and retention, and `forget` of it by the id shown found nothing."""
    path, repo, snap, files = small_files
    if name == "upper-case-id":
        name = snap.id.upper()
    stray = path / "snapshots" / name
    stray.write_bytes(b"x")
    with Repository.open(str(path), "correct horse battery staple") as again:
        assert [s.id for s in again.snapshots()] == [snap.id]
        report = again.check()
        assert report.ok and any(f"snapshots/{name}" in w for w in report.warnings), report
        assert list(again.list_objects("snapshots")) == [snap.id]  # `list snapshots`, `cat snapshot`
        again.backup([str(tmp_path / "src")])
        again.forget(policy=RetentionPolicy(keep_last=1))
        again.prune()
    assert stray.read_bytes() == b"x"


def test_a_local_copy_that_is_not_the_stored_object_is_dropped_and_the_stored_one_read(tmp_path):
    """A cache entry whose framing checks but that holds another object (another cache's, planted): the
    snapshots were left out and check advised forgetting them, while the repository was whole."""
    import warnings

    from chunkvault.remotes.layer import wrap_remote
    from chunkvault.remotes.local import LocalRemote

    path, cache = str(tmp_path / "repo"), tmp_path / "cache"
    src = tmp_path / "src"
    src.mkdir()
    repo = Repository.init(path, "pw", kdf_seconds=0, ledger=False)
    ids = []
    for i in range(2):
        (src / f"f{i}").write_bytes(os.urandom(5000))
        ids.append(repo.backup([str(src)]).snapshot.id)
    with Repository.open(wrap_remote(LocalRemote(path), cache_dir=cache), "pw", ledger=False) as cached:
        cached.restore("latest", str(tmp_path / "first"))  # every snapshot and index object now in the cache
    for kind in ("snapshots", "index"):
        entries = sorted(p for p in (cache / kind).iterdir())
        assert len(entries) >= 2, entries
        first, second = entries[0].read_bytes(), entries[1].read_bytes()
        entries[0].write_bytes(second)
        entries[1].write_bytes(first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no snapshot left out as unreadable
        with Repository.open(wrap_remote(LocalRemote(path), cache_dir=cache), "pw", ledger=False) as cached:
            assert [s.id for s in cached.snapshots()] == ids
            assert cached.check().ok
            cached.restore("latest", str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["f0", "f1"]


def test_archived_wal_objects_are_cached_by_version_and_check_reads_the_stored_ones(tmp_path):
    """``wal/`` objects are read by every ``archive-list``, ``copy --wal`` and prune: kept in the cache
    under the version their listing gives, a second reading fetches none.  A planted entry (another
    object's) is dropped and the stored one read; damage to the stored object that its version does not
    show is still found by check, which reads past the cache."""
    from chunkvault.remotes.layer import _VERSIONED_MAGIC, _versioned, encode_cache_entry, wrap_remote
    from chunkvault.remotes.local import LocalRemote, file_version

    path, cache = str(tmp_path / "repo"), tmp_path / "cache"
    repo = Repository.init(path, "pw", kdf_seconds=0, ledger=False)
    names = [f"00000001000000000000000{i}" for i in range(1, 4)]
    for i, name in enumerate(names):
        repo.archive_push(write_segment(tmp_path, name, i, 1 << 20))
    repo.close()

    def listed(expect_gets: int) -> None:
        remote = wrap_remote(LocalRemote(path), cache_dir=cache)
        gets = []
        inner_get = remote.inner.get
        remote.inner.get = lambda key, *a: (gets.append(key) if key.startswith("wal/") else None) or inner_get(key, *a)
        with Repository.open(remote, "pw", ledger=False) as cached:
            assert [w.name for w in cached.archive_list()] == names
        assert len(gets) == expect_gets, gets

    listed(3)
    listed(0)
    entries = sorted((cache / "wal").iterdir())
    assert [e.name for e in entries] == names
    planted = entries[0].read_bytes()
    entries[0].write_bytes(entries[1].read_bytes())
    entries[1].write_bytes(planted)
    listed(2)  # each entry records its object's version: another object's is not served for it
    stored = tmp_path / "repo" / "wal" / names[0]
    st = stored.stat()
    other = (tmp_path / "repo" / "wal" / names[1]).read_bytes()  # under this one's version: it does not open
    entries[0].write_bytes(encode_cache_entry(_versioned(file_version(st), other), _VERSIONED_MAGIC))
    listed(1)
    sealed = stored.read_bytes()
    stored.write_bytes(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same version: the cache cannot tell
    listed(0)
    with Repository.open(wrap_remote(LocalRemote(path), cache_dir=cache), "pw", ledger=False) as cached:
        assert [p.object for p in cached.check().problems] == [f"wal/{names[0]}"]
    # A recovery reads each object once: what its restore_command fetches ahead is not kept.
    spool = tmp_path / "spool"
    spool.mkdir()
    with Repository.open(wrap_remote(LocalRemote(path), cache_dir=tmp_path / "recovery"), "pw", ledger=False) as r:
        fetched, _ = r.archive_prefetch(names[0], spool, 2)
    assert [w.name for w in fetched] == names[1:] and not (tmp_path / "recovery" / "wal").exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_the_links_of_a_damaged_file_are_named_among_the_files_not_restored(tmp_path, new_repo, processes):
    """They were a warning each ("its target was not restored") while the error said everything else was."""
    from chunkvault.errors import CorruptObject

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "h1").write_bytes(os.urandom(50_000))
    os.link(src / "a" / "h1", src / "a" / "h2")
    os.link(src / "a" / "h1", src / "b_h3")
    (src / "ok").write_bytes(b"fine")
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    repo.store.load_index()
    damage_blob(tmp_path / "repo", repo, repo.find_entry(snap, "a/h1").chunk_ids()[0])
    with pytest.raises(CorruptObject, match=r"3 file\(s\) not restored: a/h1, a/h2, b_h3 "
                                            r"\(everything else was restored\)") as info:
        repo.restore(snap, str(tmp_path / "out"), processes=processes)
    assert not any("hard link" in w for w in info.value.partial.warnings)
    assert (tmp_path / "out" / "ok").read_bytes() == b"fine"
    named = [f for p in repo.check(read_data=True).problems for f in p.files]
    assert sorted(named) == [f"{snap.id[:8]}:{path}" for path in ("a/h1", "a/h2", "b_h3")]


def test_in_place_the_links_of_a_damaged_file_keep_what_the_target_had_and_are_named(tmp_path, new_repo):
    """The damaged file is left as the target had it; its hard link was remade to that old file, counted as
    restored and not named."""
    from chunkvault.errors import CorruptObject

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(200_000))
    os.link(src / "f", src / "hl")
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    repo.store.load_index()
    damage_blob(tmp_path / "repo", repo, repo.find_entry(snap, "f").chunk_ids()[0])
    target = tmp_path / "target"
    target.mkdir()
    (target / "f").write_bytes(b"OLD f")
    (target / "hl").write_bytes(b"OLD hl")
    for delta in (False, True):
        with pytest.raises(CorruptObject, match=r"2 file\(s\) not restored: f, hl "):
            repo.restore(snap, str(target), force=True, delta=delta)
        assert (target / "f").read_bytes() == b"OLD f" and (target / "hl").read_bytes() == b"OLD hl"


def _plant_look_alike(repo_dir, repo, snap) -> tuple:
    """What whoever holds the storage can make without the key: a pack of other bytes under the real
    pack's sealed header, named by its hash as every pack is, sorting before the real one.  The manifest's
    blobs stay (a reader takes either copy, and does not yet try the other when one fails)."""
    from chunkvault.store.crypto import content_name
    from chunkvault.store.pack import fetch_header

    (real,) = [p for p in (repo_dir / "data").rglob("*") if p.is_file()]
    data = real.read_bytes()
    entries = fetch_header(repo._repo.sealer, lambda offset, length: data[offset:offset + length], len(data),
                           "pack").entries
    kept = {bytes.fromhex(h) for h in snap.manifest}
    for _ in range(256):
        fake = bytearray(data)
        for e in entries:
            if e.blob_id not in kept:
                fake[e.offset : e.offset + e.length] = os.urandom(e.length)
        name = content_name(fake)
        if name < real.name:
            break
    planted = repo_dir / "data" / name[:2] / name
    planted.parent.mkdir(exist_ok=True)
    planted.write_bytes(fake)
    return real, planted, entries


def test_repair_index_leaves_out_a_look_alike_pack_whose_copies_do_not_verify(small_files, tmp_path):
    """A look-alike pack reads as the real one by its header: indexed, `check` passed it, and a prune kept
    its copies (the lower pack id) and deleted the real pack."""
    path, repo, snap, files = small_files
    real, planted, entries = _plant_look_alike(path, repo, snap)
    repaired = repo.repair_index()
    assert repaired.blobs == len(entries) + len(snap.manifest)  # the look-alike's copies that verify stay
    assert [u for u in repaired.unreadable_packs if "do not verify" in u] == [
        f"data/{planted.parent.name}/{planted.name}: in no index, and {len(entries) - len(snap.manifest)} of its "
        "blob(s) do not verify (damaged, or not sealed with this repository's key): left out of the index"]
    repo.prune()
    assert real.exists()
    repo.restore(snap.id, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == files
    problems = repo.check(read_data=True).problems  # the look-alike is named: it holds what no key sealed
    assert problems and all(planted.name in p.object + p.problem for p in problems)


def test_prune_keeps_the_copy_that_verifies_of_a_blob_two_packs_hold(small_files, tmp_path, password):
    """The look-alike already indexed (by an older `repair index`): the prune reads the copy it would keep
    before deleting the other, and keeps the real one."""
    from chunkvault.errors import RepositoryStateWarning
    from chunkvault.store.indexfile import IndexData

    path, repo, snap, files = small_files
    real, planted, entries = _plant_look_alike(path, repo, snap)
    index = IndexData()
    index.packs[bytes.fromhex(planted.name)] = entries
    repo._repo.write_index(index)
    repo = Repository.open(str(path), password)
    with pytest.warns(RepositoryStateWarning, match=f"its copy in data/{planted.parent.name}/{planted.name} does "
                                                    "not verify"):
        repo.prune()
    assert real.exists()
    repo.restore(snap.id, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == files
    assert repo.check(read_data=True).ok


@pytest.mark.parametrize("how", ["deleted", "index rolled back"])
def test_a_backup_that_would_refer_to_a_pack_that_is_gone_stops_and_names_repair_index(tmp_path, new_repo, how):
    """New files whose data a pack no longer stored held: the backup said 0 B added and saved a snapshot no
    restore could read.  Gone by hand, or by an old index put back after a prune deleted the pack."""
    repo_dir = tmp_path / "repo"
    repo = new_repo(str(repo_dir))
    a, b, c = (tmp_path / name for name in ("a", "b", "c"))
    for d in (a, b, c):
        d.mkdir()
    data = os.urandom(300_000)
    (a / "one").write_bytes(data)
    (b / "two").write_bytes(os.urandom(200_000))
    first = repo.backup([str(a)]).snapshot
    if how == "deleted":
        (pack,) = [p for p in (repo_dir / "data").rglob("*") if p.is_file()]
        pack.unlink()
    else:
        repo.backup([str(b)])
        saved = {p.name: p.read_bytes() for p in (repo_dir / "index").iterdir()}
        repo.forget([first.id])
        repo.prune()
        for p in (repo_dir / "index").iterdir():
            p.unlink()
        for name, body in saved.items():
            (repo_dir / "index" / name).write_bytes(body)
    (c / "again").write_bytes(data)
    before = {s.id for s in repo.snapshots()}
    with pytest.raises(MissingObject, match="is listed by the index but not stored.*`chunkvault repair index`"):
        repo.backup([str(c)])
    assert {s.id for s in repo.snapshots()} == before
    repo.repair_index()
    snap = repo.backup([str(c)]).snapshot
    repo.restore(snap.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "again").read_bytes() == data


@pytest.mark.parametrize("how", ["emptied", "cut short", "a directory in its place"])
def test_a_backup_that_would_refer_to_a_pack_cut_short_or_not_a_file_stops(tmp_path, new_repo, how):
    """New files whose data a pack held that the storage now keeps cut short (emptied, or a directory in its
    place on local disk, which no listing names and no read opens): the backup said 0 B added and saved a
    snapshot no restore could read, where the listing's size (or the stat) showed the pack could not hold
    them."""
    repo_dir = tmp_path / "repo"
    repo = new_repo(str(repo_dir))
    a, c = tmp_path / "a", tmp_path / "c"
    a.mkdir()
    c.mkdir()
    data = os.urandom(300_000)
    (a / "one").write_bytes(data)
    repo.backup([str(a)])
    (pack,) = [p for p in (repo_dir / "data").rglob("*") if p.is_file()]
    if how == "a directory in its place":
        pack.unlink()
        pack.mkdir()
    else:
        pack.write_bytes(b"" if how == "emptied" else pack.read_bytes()[:1000])
    (c / "again").write_bytes(data)
    before = {s.id for s in repo.snapshots()}
    with pytest.raises((MissingObject, CorruptObject), match=pack.name):
        repo.backup([str(c)])
    assert {s.id for s in repo.snapshots()} == before
    if how == "a directory in its place":
        pack.rmdir()
        repo.repair_index()
    else:
        repo.repair_packs([pack.name], dry_run=False)
    snap = repo.backup([str(c)]).snapshot
    repo.restore(snap.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "again").read_bytes() == data


def test_a_backup_asks_the_storage_about_none_of_the_packs_it_stored_itself(tmp_path):
    """Each pack deduplicated against and missing from the listing was asked for one at a time, those the
    backup had just stored among them: thousands of requests in a row at the end of a large backup."""
    from chunkvault.remotes.local import LocalRemote

    asked: list[str] = []

    class Counting(LocalRemote):
        def stat(self, key: str):
            asked.append(key)
            return super().stat(key)

    path = str(tmp_path / "repo")
    Repository.init(path, "pw", kdf_seconds=0, pack_size="1M", ledger=False).close()
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(os.urandom(2 << 20))
    repo = Repository.open(Counting(path), "pw", ledger=False)
    repo.backup([str(src)])
    block = os.urandom(8 << 20)
    (src / "a-copy-of-old").write_bytes((src / "old").read_bytes())  # deduplicated against stored packs
    (src / "b-new").write_bytes(block)
    (src / "c-more").write_bytes(os.urandom(24 << 20))  # meanwhile b-new's packs are stored
    (src / "d-new-again").write_bytes(block)  # deduplicated against the packs this backup stored
    asked.clear()
    snap = repo.backup([str(src)]).snapshot
    assert not [k for k in asked if k.startswith("data/")]
    repo.restore(snap.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "d-new-again").read_bytes() == block


def test_prune_reads_the_copies_it_verifies_a_pack_at_a_time(tmp_path):
    """Two hosts backing up the same files at once store them twice; a prune then read each kept copy with
    a request of its own, one after another (20,000 requests for 20,000 small files)."""
    import threading

    from chunkvault.remotes.local import LocalRemote

    reads: list[tuple[str, int | None]] = []

    class Counting(LocalRemote):
        def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
            if key.startswith("data/") and start is not None:
                reads.append((key, start))
            return super().get(key, start, length)

    path = str(tmp_path / "repo")
    Repository.init(path, "pw", kdf_seconds=0, ledger=False).close()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        (src / f"f{i}").write_bytes(os.urandom(2000))
    hosts = [Repository.open(path, "pw", ledger=False) for _ in range(2)]
    start = threading.Barrier(2)

    def back_up(repo) -> None:
        start.wait()
        repo.backup([str(src)])

    threads = [threading.Thread(target=back_up, args=(r,)) for r in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    repo = Repository.open(Counting(path), "pw", ledger=False)
    plan = repo.prune(dry_run=True, max_unused=0)
    packs = {key for key, _ in reads}
    assert plan.delete or plan.repack  # the second copies go
    assert reads and len(reads) <= 2 * len(packs)  # a pack's copies in a run or two, not 300 requests
    repo.prune(max_unused=0)
    assert repo.check(read_data=True).ok


def _two_damaged_packs(tmp_path, new_repo):
    """A repository of three small packs, a byte flipped in one blob of each of the first two."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(11)
    for i in range(3):
        (src / f"f{i}").write_bytes(rnd.randbytes(900_000))
    repo = new_repo(str(tmp_path / "repo"), pack_size=1_000_000)
    snap = repo.backup([str(src)]).snapshot
    damaged = []
    for victim in (c for name in ("f0", "f1", "f2") for c in chunk_ids(repo, snap, name)):
        pack = pack_path(tmp_path / "repo", repo, victim)
        if pack.name in damaged:
            continue
        loc = repo.store.locate(victim)
        flip(pack, loc.offset + loc.length // 2)
        damaged.append(pack.name)
        if len(damaged) == 2:
            return repo, snap, src, damaged
    raise AssertionError("the data fits one pack")


def test_a_repair_of_packs_rerun_once_its_named_packs_are_gone_names_what_it_left_in_no_index(tmp_path, new_repo,
                                                                                               password):
    """Stopped after it deleted the packs it was given but before the packs of deltas whose base they held
    (written anew without them): run again, it said only "no such pack" (exit 2), and those stayed in no
    index.  It says to run `repair index` first, which names the `repair packs` to run next."""
    from chunkvault.errors import UsageError

    repo, _, _, damaged = _two_damaged_packs(tmp_path, new_repo)
    named, left = (next((tmp_path / "repo" / "data").rglob(name)) for name in damaged)
    aside = tmp_path / "aside"
    aside.mkdir()
    for pack in (named, left):
        pack.rename(aside / pack.name)
    repo.repair_index()  # the index as the stopped repair left it: neither pack in it
    (aside / left.name).rename(left)
    repo = Repository.open(str(tmp_path / "repo"), password)
    with pytest.raises(UsageError, match=r"1 stored pack\(s\) are in no index .*run `repair index` first"):
        repo.repair_packs([named.name], dry_run=False)
    assert left.exists()


@pytest.mark.parametrize("then", ["again", "repair index"])
def test_a_repair_of_packs_stopped_midway_is_run_again_or_mended_by_repair_index(tmp_path, new_repo, password,
                                                                                 monkeypatch, then):
    """Stopped after it deleted the first pack: run again, it refused ("no such pack"); `repair index`, as
    check advised, indexed the second pack again whole, damaged blob included, and the next backup
    deduplicated against it and did not restore."""
    repo, snap, src, damaged = _two_damaged_packs(tmp_path, new_repo)
    real_delete = type(repo.store.remote).delete
    deleted = []

    def killed_after_one(self, key):
        if key.startswith("data/"):
            if deleted:
                raise KeyboardInterrupt
            deleted.append(key)
        real_delete(self, key)

    monkeypatch.setattr(type(repo.store.remote), "delete", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        repo.repair_packs(damaged, dry_run=False)
    monkeypatch.undo()
    repo = Repository.open(str(tmp_path / "repo"), password)
    if then == "again":
        report = repo.repair_packs(damaged, dry_run=False)
        assert any("no such pack" in p for p in report.unreadable_packs)
    else:
        report = repo.repair_index()
        assert any("do not verify" in p for p in report.unreadable_packs)
    repo.repair_snapshots(dry_run=False)
    after = repo.backup([str(src)]).snapshot
    repo.restore(after.id, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == \
        {p.name: p.read_bytes() for p in src.iterdir()}
    if then == "repair index":  # the pack it indexed again in part still holds the damaged bytes
        repo.repair_packs(damaged[1:], dry_run=False)
    assert repo.check(read_data=True).ok



def test_a_damaged_manifest_blob_names_every_snapshot_it_takes_down(chain, password):
    """The full's manifest blob flipped: the snapshot's problem named the differential built on it, the
    blob's own (what a program keying on blobs or packs reads) the full alone."""
    repo_dir, repo, full, diff, _ = chain
    blob = bytes.fromhex(full.manifest[0])
    pack = pack_path(repo_dir, repo, blob)
    loc = repo.store.locate(blob)
    flip(pack, loc.offset + loc.length // 2)
    problems = Repository.open(str(repo_dir), password).check(read_data=True).problems
    (own,) = [p for p in problems if p.object == f"blob {blob.hex()}"]
    assert sorted(own.snapshots) == sorted([full.id, diff.id])


UNPRIVILEGED = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]  # root, held to file modes


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_linked_directory_whose_files_cannot_be_reached_is_an_error_naming_them(small_files, cli, tmp_path):
    """data/ab on another disk, linked, in a directory that may be read but not passed through: its names
    listed, each stat failed, and the PermissionError was an internal error (exit 1)."""
    repo_dir, repo, snap, files = small_files
    (victim,) = chunk_ids(repo, snap, "f0")
    linked = pack_path(repo_dir, repo, victim).parent
    moved = tmp_path / "elsewhere" / linked.name
    moved.parent.mkdir()
    shutil.move(str(linked), moved)
    linked.symlink_to(moved)
    moved.chmod(0o444)
    try:
        proc = cli("check", "-r", str(repo_dir), wrap=UNPRIVILEGED, check=False)
        assert proc.returncode == 14, proc.stderr
        assert proc.stderr.decode().startswith(f"chunkvault: permission denied while listing data/{linked.name}/")
    finally:
        moved.chmod(0o700)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("name", ["lost+found", ".Trash-1000", "@eaDir"])
def test_a_closed_directory_no_object_can_lie_in_is_passed_over(small_files, cli, name):
    """data/ on a disk of its own has a lost+found its user may not open: no key names it, so no listing
    walks into it (one did, and every check, prune and backup of that user failed on it)."""
    repo_dir, repo, snap, files = small_files
    closed = repo_dir / "data" / name
    closed.mkdir()
    closed.chmod(0)
    try:
        proc = cli("check", "-r", str(repo_dir), wrap=UNPRIVILEGED, check=False)
        assert proc.returncode == 0, proc.stderr
    finally:
        closed.chmod(0o700)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("where", ["data/ab", "index", "snapshots"])
def test_a_directory_that_does_not_open_is_an_error_naming_it_never_an_empty_listing(small_files, cli, where):
    """A directory of the repository given mode 000 listed as empty: its packs were missing to `check`,
    `repair index` replaced the index with one without them, and with `snapshots/` closed the repository
    had no snapshots (a restore: no such snapshot).  Each now stops, naming the directory, and changes
    nothing."""
    repo_dir, repo, snap, files = small_files
    if where == "data/ab":
        (victim,) = chunk_ids(repo, snap, "f0")
        where = f"data/{pack_path(repo_dir, repo, victim).parent.name}"
    index_before = sorted(os.listdir(repo_dir / "index"))
    os.chmod(repo_dir / where, 0)
    try:
        # (`repair index` reads no snapshot, `snapshots` neither packs nor index)
        for args, lists in ((["check"], True), (["repair", "index"], where != "snapshots"),
                            (["snapshots"], where == "snapshots")):
            proc = cli(*args, "-r", str(repo_dir), wrap=UNPRIVILEGED, check=False)
            if not lists:
                assert proc.returncode == 0, proc.stderr
                continue
            assert proc.returncode == 14, proc.stderr
            assert proc.stderr.decode() == f"chunkvault: permission denied while listing {where}: Permission denied\n"
    finally:
        os.chmod(repo_dir / where, 0o700)
    if where != "snapshots":
        assert sorted(os.listdir(repo_dir / "index")) == index_before
    cli("check", "-r", str(repo_dir))


def test_a_stored_index_object_cut_short_is_not_hidden_by_the_local_copy(tmp_path):
    """A stored index object cut short (a server's full disk, a copy stopped half-way) was read from the local
    cache, whole, by that client alone: its backups found nothing wrong and left the chunks only that object
    lists to it, so what they saved did not restore from any other machine.  The listing gives the stored
    size: a copy of another size is not served, and the backup leaves the object out and stores again what
    only it listed, as one without a cache does."""
    from chunkvault.errors import RepositoryStateWarning
    from chunkvault.remotes.layer import wrap_remote
    from chunkvault.remotes.local import LocalRemote

    path, cache = str(tmp_path / "repo"), tmp_path / "cache"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(50_000))
    repo = Repository.init(path, "pw", kdf_seconds=0, ledger=False)
    repo.backup([str(src)])
    repo.close()
    with Repository.open(wrap_remote(LocalRemote(path), cache_dir=cache), "pw", ledger=False) as cached:
        cached.restore("latest", str(tmp_path / "first"))  # its index object now in the cache
    [stored] = (tmp_path / "repo" / "index").iterdir()
    assert (cache / "index" / stored.name).exists()
    stored.write_bytes(stored.read_bytes()[:100])
    with Repository.open(wrap_remote(LocalRemote(path), cache_dir=cache), "pw", ledger=False) as cached:
        with pytest.warns(RepositoryStateWarning, match=f"index/{stored.name[:12]} does not load and is left out"):
            saved = cached.backup([str(src)]).snapshot
    with pytest.warns(RepositoryStateWarning, match="does not load and is left out"):
        with Repository.open(path, "pw", ledger=False) as elsewhere:  # no cache: as another machine reads it
            elsewhere.restore(saved.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_bytes() == (src / "f").read_bytes()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_pack_its_user_may_not_read_is_an_error_never_damage_to_repair(small_files, cli):
    """A pack file the user running the command may not read (root's, mode 0600, in a repository that user
    otherwise reads and writes): `check` called it damage and advised `repair packs`, which counted every
    blob of it lost and, confirmed, deleted the pack, the only copy of its data.  Access refused says
    nothing of the pack: each stops, naming it (exit 14), and changes nothing."""
    repo_dir, repo, snap, files = small_files
    (victim,) = chunk_ids(repo, snap, "f0")
    pack = pack_path(repo_dir, repo, victim)
    name = f"data/{pack.parent.name}/{pack.name}"
    index_before = sorted(os.listdir(repo_dir / "index"))
    pack.chmod(0)
    try:
        for args in (["check"], ["check", "--read-data"], ["repair", "index"],
                     ["repair", "packs", pack.name[:12], "--confirm", "REPAIR"]):
            proc = cli(*args, "-r", str(repo_dir), wrap=UNPRIVILEGED, check=False)
            assert proc.returncode == 14, (args, proc.stdout, proc.stderr)
            assert proc.stderr.decode() == f"chunkvault: permission denied while reading {name}: Permission denied\n"
            assert pack.exists()
    finally:
        pack.chmod(0o600)
    assert sorted(os.listdir(repo_dir / "index")) == index_before
    assert not os.listdir(repo_dir / "locks")
    cli("check", "--read-data", "-r", str(repo_dir))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_access_refused_by_another_users_file_names_its_owner(small_files, cli, tmp_path):
    """A command run as another user in a service account's repository leaves files of that user's, mode 0600
    (or the repository is another's, mode 0700): the account's commands said "permission denied while
    reading config: Permission denied", with nothing on why.  They name whose the path is, and its mode."""
    import pwd

    repo_dir, repo, snap, files = small_files
    other = 65534
    try:
        owner = pwd.getpwuid(other).pw_name
    except KeyError:
        owner = f"uid {other}"
    (victim,) = chunk_ids(repo, snap, "f0")
    pack = pack_path(repo_dir, repo, victim)
    os.chown(pack, other, other)
    try:
        proc = cli("restore", "-r", str(repo_dir), "latest", "--target", str(tmp_path / "out"), wrap=UNPRIVILEGED,
                   check=14)
        assert proc.stderr.decode().endswith(
            f"Permission denied ({pack} belongs to {owner}, mode 0600; this command runs as root)\n")
    finally:
        os.chown(pack, 0, 0)
    os.chown(repo_dir, other, other)
    try:
        proc = cli("snapshots", "-r", str(repo_dir), wrap=UNPRIVILEGED, check=14)
        assert proc.stderr.decode() == ("chunkvault: permission denied while reading config: Permission denied "
                                        f"({repo_dir} belongs to {owner}, mode 0700; this command runs as root)\n")
    finally:
        os.chown(repo_dir, 0, 0)
    # the repository's own directory, not writable to its user: nobody else's doing, nothing more said
    os.chmod(repo_dir / "locks", 0o500)
    try:
        proc = cli("backup", "-r", str(repo_dir), str(tmp_path / "src"), wrap=UNPRIVILEGED, check=14)
        assert proc.stderr.decode().endswith(": Permission denied\n")
    finally:
        os.chmod(repo_dir / "locks", 0o700)
