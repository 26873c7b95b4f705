"""Owners by name: a snapshot records its owner ids' user and group names, and a restore as root on a
machine where those names have other ids gives the entries the local ids (as tar and borg do).

A machine whose user database differs is simulated on the backup side only: the backup looks names up
through ``owners.user_name``/``group_name``, replaced here by a table in which ``nobody`` has uid 4242 and
``nogroup`` gid 4343.  The restore then looks the names up in this machine's real database, where they
have other ids, so the restore runs as it would on a second machine."""
import contextlib
import grp
import io
import json
import os
import pwd
import stat
import struct
import subprocess
import sys
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chunkvault.store import owners, posix_acl
from chunkvault.store.manifest import OP_DELETE, OP_ENTRY, T_FILE, Entry, Record
from chunkvault.store.owners import OwnerMap, chain_names, chain_owners, names_of, stored_names
from chunkvault.verify import compare_tree, verify_restore

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="sets owners: needs root")

BACKUP_UID, BACKUP_GID = 4242, 4343  # the ids "nobody" and "nogroup" have on the backed-up machine


def _local(name_of, name):
    try:
        return name_of(name)
    except KeyError:
        return None


USER = "nobody"
GROUP = next(g for g in ("nogroup", "nobody") if _local(grp.getgrnam, g) is not None)
LOCAL_UID, LOCAL_GID = pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid


@pytest.fixture
def other_machine_names(monkeypatch):
    """The backup's name lookups answer as the backed-up machine would."""
    real_user, real_group = owners.user_name, owners.group_name
    monkeypatch.setattr(owners, "user_name", lambda uid: USER if uid == BACKUP_UID else real_user(uid))
    monkeypatch.setattr(owners, "group_name", lambda gid: GROUP if gid == BACKUP_GID else real_group(gid))


# --- pure logic --------------------------------------------------------------------------------------------


def test_names_of_names_every_id_as_it_is_named_now_the_parent_s_included():
    """As a full taken at the same moment would: an inherited id renamed since takes its new name, one
    that has none now (its user deleted) is dropped, and the parent's ids are looked up again."""
    users = {1000: "alice", 0: "root", 8: "mallory"}
    got = names_of([1000, 0, 77], [50], {"owners": {"users": {"1000": "old", "9": "bob", "8": "carol"},
                                                    "groups": {"51": "gone", "52": "kept"}}},
                   user=users.get, group={50: "staff", 52: "kept"}.get)
    assert got == {"users": {"0": "root", "8": "mallory", "1000": "alice"}, "groups": {"50": "staff", "52": "kept"},
                   "unnamed": {"users": [9, 77], "groups": [51]}}


def test_an_id_without_a_name_is_looked_up_again_by_the_next_differential():
    """An unchanged file's owner given a name after the parent was taken: a differential reads no unchanged
    file, so it named only the ids its parent's table held, and that one went unnamed until the next full."""
    parent = {"owners": names_of([0, 4321], [0], user={0: "root"}.get, group={0: "root"}.get)}
    assert parent["owners"] == {"users": {"0": "root"}, "groups": {"0": "root"},
                                "unnamed": {"users": [4321], "groups": []}}
    later = names_of([], [], parent, user={0: "root", 4321: "carol"}.get, group={0: "root"}.get)
    assert later == {"users": {"0": "root", "4321": "carol"}, "groups": {"0": "root"}}
    assert chain_owners([parent]) == parent["owners"]  # kept by an export, a rebase or an aggregate
    junk = {"owners": {"users": {}, "groups": {}, "unnamed": {"users": [True, -1, 1 << 40, "5", 6], "groups": "x"}}}
    assert names_of([], [], junk, user={6: "six"}.get, group={}.get) == {"users": {"6": "six"}, "groups": {}}


def test_stored_names_ignore_what_is_not_an_id_and_a_name():
    stats = {"owners": {"users": {"1": "a", "x": "b", "2": 3, "3": "", "\uff14": "d", "5": "ro\x00ot"},
                        "groups": ["1"]}}
    assert stored_names(stats) == ({1: "a"}, {})
    assert stored_names({}) == ({}, {}) and stored_names({"owners": "junk"}) == ({}, {})


def test_the_newest_table_of_a_chain_names_its_ids():
    """Each table covers its chain (``names_of``): an id the newest leaves out has no name any more."""
    older = {"owners": {"users": {"1": "a", "2": "b"}, "groups": {"1": "g"}}}
    newer = {"owners": {"users": {"2": "c"}, "groups": {}}}
    assert chain_names([older, {}, newer]) == ({2: "c"}, {})
    assert chain_names([older, {"files": 3}]) == ({1: "a", 2: "b"}, {1: "g"})  # a newer one kept none
    assert chain_names([{}, {}]) == ({}, {})


def test_only_names_known_here_under_another_id_move_an_owner():
    here = {"alice": 1000, "bob": 7}.get
    m = OwnerMap.from_names({1000: "alice", 5: "bob", 6: "carol"}, {5: "bob"}, user=here, group=here)
    assert m.users == {5: 7} and m.groups == {5: 7}
    moved = m.entry(Entry(b"f", T_FILE, uid=5, gid=5))
    assert (moved.uid, moved.gid) == (7, 7)
    kept = Entry(b"g", T_FILE, uid=6, gid=1000)
    assert m.entry(kept) is kept
    assert not OwnerMap.from_names({1000: "alice"}, {}, user=here, group=here)


def test_the_names_not_known_here_that_mapped_entries_named_are_listed():
    here = {"alice": 1000}.get
    m = OwnerMap.from_names({1000: "alice", 5: "bob", 6: "carol"}, {7: "dev", 8: "ops"}, user=here, group=here)
    assert m and not m.users and not m.groups and m.missed() is None
    kept = Entry(b"f", T_FILE, uid=5, gid=0)
    assert m.entry(kept) is kept  # its number stays: the name is unknown here
    acl = _acl((posix_acl.USER_OBJ, 6, ANY), (posix_acl.GROUP, 4, 8), (posix_acl.MASK, 6, ANY),
               (posix_acl.OTHER, 0, ANY))
    m.entry(Entry(b"g", T_FILE, uid=1000, gid=1000, xattrs=owners.encode_xattrs({posix_acl.ACL_KEYS[0]: acl})))
    assert m.missed() == ("owner names unknown on this machine, set by their recorded ids instead: "
                          "user bob (5), group ops (8)")  # carol and dev own nothing mapped
    many = OwnerMap.from_names({i: f"u{i}" for i in range(20)}, {}, user=here, group=here)
    for i in range(20):
        many.entry(Entry(b"f", T_FILE, uid=i, gid=0))
    assert many.missed().endswith("user u9 (9) and 10 more")


def test_a_group_unknown_here_is_named_by_the_file_s_group_not_its_user():
    """The owning group is looked up by the entry's gid, whatever its uid: a file of root's in group 5000
    ("ghost", unknown here) names the group, and one of user 5000 in group root names nothing."""
    here = {"root": 0}.get
    m = OwnerMap.from_names({0: "root"}, {5000: "ghost"}, user=here, group=here)
    m.entry(Entry(b"f", T_FILE, uid=0, gid=5000))
    assert m.missed() == "owner names unknown on this machine, set by their recorded ids instead: group ghost (5000)"
    other = OwnerMap.from_names({0: "root"}, {5000: "ghost"}, user=here, group=here)
    other.entry(Entry(b"g", T_FILE, uid=5000, gid=0))
    assert other.missed() is None


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), max_size=30),
       st.dictionaries(st.integers(0, 20), st.sampled_from(["a", "b", "c", "d"])),
       st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 20)))
def test_mapped_records_take_the_local_id_of_their_recorded_name_or_keep_theirs(owned, recorded, local):
    m = OwnerMap.from_names(recorded, recorded, user=local.get, group=local.get)
    records = [Record(OP_ENTRY, b"f%d" % i, Entry(b"f%d" % i, T_FILE, uid=u, gid=g)) for i, (u, g) in enumerate(owned)]
    records.append(Record(OP_DELETE, b"gone", None))
    before = [(r.entry.uid, r.entry.gid) for r in records[:-1]]
    out = list(m.records(iter(records)))
    assert [r.path for r in out] == [r.path for r in records] and out[-1].entry is None
    for (u, g), r in zip(owned, out):
        expect = [local.get(recorded[i], i) if i in recorded else i for i in (u, g)]
        assert [r.entry.uid, r.entry.gid] == expect
    assert [(r.entry.uid, r.entry.gid) for r in records[:-1]] == before  # the tree's entries stay as they were


# --- a backup on one machine, restored on another --------------------------------------------------------


def _tree(tmp_path):
    """A directory and file of the backup user's, and a file of root's; modes as given, whatever the umask."""
    src = tmp_path / "src"
    (src / "db").mkdir(parents=True)
    os.chmod(src / "db", 0o755)
    (src / "db" / "table").write_bytes(b"rows" * 1000)
    (src / "mine").write_bytes(b"root's")
    os.chown(src / "db", BACKUP_UID, BACKUP_GID)
    os.chown(src / "db" / "table", BACKUP_UID, BACKUP_GID)
    return src


def _owner(path):
    st = os.lstat(path)
    return st.st_uid, st.st_gid


@needs_root
def test_a_restore_as_root_gives_owners_the_local_ids_of_their_recorded_names(tmp_path, new_repo,
                                                                             other_machine_names):
    repo = new_repo()
    src = _tree(tmp_path)
    snap = repo.backup([str(src)]).snapshot
    assert snap.stats["owners"]["users"][str(BACKUP_UID)] == USER
    assert snap.stats["owners"]["groups"][str(BACKUP_GID)] == GROUP
    assert snap.stats["owners"]["users"]["0"] == "root"
    (src / "db" / "table").write_bytes(b"more rows" * 1000)
    os.chown(src / "db" / "table", BACKUP_UID, BACKUP_GID)
    diff = repo.backup([str(src)], kind="diff").snapshot
    assert diff.kind == "diff" and diff.stats["owners"]["users"][str(BACKUP_UID)] == USER

    for i, (which, numeric) in enumerate([(snap, False), (diff, False), (diff, True)]):
        out = tmp_path / f"out{i}"
        repo.restore(which, str(out), numeric_owner=numeric, verify=True, processes=1 + i % 2)
        want = (BACKUP_UID, BACKUP_GID) if numeric else (LOCAL_UID, LOCAL_GID)
        assert _owner(out / "db") == want and _owner(out / "db" / "table") == want
        assert _owner(out / "mine") == (0, 0)
    again = repo.restore(diff, str(tmp_path / "out1"), force=True, delta=True)  # in place: owners already right
    assert again.unchanged_files == 2 and again.rewritten_bytes == 0
    assert _owner(tmp_path / "out1" / "db" / "table") == (LOCAL_UID, LOCAL_GID)

    report = verify_restore(repo, diff)
    assert report.ok, report.mismatches
    assert verify_restore(repo, diff, numeric_owner=True).ok


@needs_root
@pytest.mark.parametrize("processes", [1, 2])
def test_a_restore_names_the_owner_names_this_machine_does_not_know(tmp_path, new_repo, monkeypatch, processes):
    """Their entries keep the recorded numbers, which may be another local user's: said, not silent."""
    gone = "cv-no-such-user"
    real_user = owners.user_name
    monkeypatch.setattr(owners, "user_name", lambda uid: gone if uid == BACKUP_UID else real_user(uid))
    repo = new_repo()
    src = _tree(tmp_path)
    repo.backup([str(src)])
    said = f"owner names unknown on this machine, set by their recorded ids instead: user {gone} ({BACKUP_UID})"
    result = repo.restore("latest", str(tmp_path / "all"), processes=processes)
    assert said in result.warnings and _owner(tmp_path / "all" / "db" / "table")[0] == BACKUP_UID
    mine = repo.restore("latest", str(tmp_path / "mine"), includes=["mine"], processes=processes)
    assert not any("unknown on this machine" in w for w in mine.warnings)  # restored nothing of theirs
    numeric = repo.restore("latest", str(tmp_path / "numeric"), numeric_owner=True, processes=processes)
    assert not any("unknown on this machine" in w for w in numeric.warnings)


@needs_root
def test_a_differential_on_a_parent_without_names_names_the_ids_of_its_whole_tree(tmp_path, new_repo,
                                                                                 other_machine_names):
    """A snapshot made before names were recorded names none: a restore keeps its ids.  A differential
    over it names every id of its tree, those of entries it does not read again too (``www``, whose
    owner nothing read names), and so does one over a differential that kept no names."""
    repo = new_repo()
    src = _tree(tmp_path)
    (src / "db" / "index").write_bytes(b"i")
    os.chown(src / "db" / "index", BACKUP_UID, BACKUP_GID)
    (src / "www").write_bytes(b"page")
    os.chown(src / "www", BACKUP_UID, 0)
    os.chown(src / "db" / "table", 0, BACKUP_GID)
    os.chown(src / "db", 0, BACKUP_GID)
    full = repo.backup([str(src)]).snapshot
    full.stats.pop("owners")
    repo.store.save_snapshot(full, replace=True)
    repo.restore(full, str(tmp_path / "unnamed"))
    assert _owner(tmp_path / "unnamed" / "db" / "index") == (BACKUP_UID, BACKUP_GID)
    for i in range(2):
        (src / "db" / "table").write_bytes(b"other rows %d" % i)  # read again: only gid BACKUP_GID among them
        os.chown(src / "db" / "table", 0, BACKUP_GID)
        diff = repo.backup([str(src)], kind="diff").snapshot
        assert diff.stats["owners"]["users"] == {"0": "root", str(BACKUP_UID): USER}
        out = tmp_path / f"named{i}"
        repo.restore(diff, str(out))
        assert _owner(out / "db" / "table") == (0, LOCAL_GID)
        assert _owner(out / "db" / "index") == (LOCAL_UID, LOCAL_GID)
        assert _owner(out / "www") == (LOCAL_UID, 0)
        diff.stats.pop("owners")  # the next one's parent kept none either
        repo.store.save_snapshot(diff, replace=True)


@needs_root
def test_the_cli_restore_maps_owners_and_numeric_owner_keeps_the_ids(tmp_path, new_repo, other_machine_names, cli):
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    src = _tree(tmp_path)
    repo.backup([str(src)])
    cli("restore", "latest", "--target", str(tmp_path / "byname"), "-r", url)
    cli("restore", "latest", "--target", str(tmp_path / "bynumber"), "--numeric-owner", "-r", url)
    rel = "db/table"
    assert _owner(tmp_path / "byname" / rel) == (LOCAL_UID, LOCAL_GID)
    assert _owner(tmp_path / "bynumber" / rel) == (BACKUP_UID, BACKUP_GID)
    out = cli("verify-restore", "latest", "--json", "-r", url)
    assert json.loads(out.stdout)["ok"]
    listing = {e["path"]: e for e in json.loads(cli("ls", "latest", "--json", "-r", url).stdout)}
    assert (listing["db/table"]["uid"], listing["db/table"]["user"], listing["db/table"]["group"]) == (
        BACKUP_UID, USER, GROUP)
    assert listing["mine"]["user"] == "root"
    text = {line.rsplit("  ", 1)[1]: line.split() for line in cli("ls", "latest", "-r", url).stdout.decode().splitlines()}
    assert text["db/table"][2] == f"{USER}/{GROUP}" and text["mine"][2] == "root/root"
    found = json.loads(cli("find", "table", "--json", "-r", url).stdout)
    assert [(v["uid"], v["user"], v["group"]) for v in found[0]["versions"]] == [(BACKUP_UID, USER, GROUP)]


@needs_root
def test_an_export_carries_the_names_to_its_import_and_to_a_restore_from_the_file(tmp_path, new_repo,
                                                                                  other_machine_names):
    from chunkvault.store.export import restore_from_file

    repo = new_repo()
    src = _tree(tmp_path)
    repo.backup([str(src)])
    (src / "db" / "table").write_bytes(b"changed")
    os.chown(src / "db" / "table", BACKUP_UID, BACKUP_GID)
    diff = repo.backup([str(src)], kind="diff").snapshot
    path = str(tmp_path / "x.backup")
    repo.export(diff, path, "export pw", kdf_seconds=0)
    rel = "db/table"
    restore_from_file(path, b"export pw", str(tmp_path / "fromfile"))
    assert _owner(tmp_path / "fromfile" / rel) == (LOCAL_UID, LOCAL_GID)
    restore_from_file(path, b"export pw", str(tmp_path / "numeric"), numeric_owner=True)
    assert _owner(tmp_path / "numeric" / rel) == (BACKUP_UID, BACKUP_GID)
    other = new_repo()
    imported = other.import_backup(path, "export pw").snapshot
    assert imported.stats["owners"]["users"][str(BACKUP_UID)] == USER
    other.restore(imported, str(tmp_path / "imported"))
    assert _owner(tmp_path / "imported" / rel) == (LOCAL_UID, LOCAL_GID)


def test_a_dumped_tar_names_the_owners_and_gnu_tar_extracts_by_name(tmp_path, new_repo, other_machine_names):
    if os.geteuid() != 0:
        pytest.skip("gives files to another owner: needs root")
    repo = new_repo()
    src = _tree(tmp_path)
    repo.backup([str(src)])
    buf = io.BytesIO()
    repo.dump("latest", "/", buf)
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(buf.getvalue()))}
    table = members["db/table"]
    assert (table.uid, table.gid, table.uname, table.gname) == (BACKUP_UID, BACKUP_GID, USER, GROUP)
    assert members["mine"].uname == "root"
    out = tmp_path / "untarred"
    out.mkdir()
    subprocess.run(["tar", "-x", "-C", str(out)], input=buf.getvalue(), check=True)
    assert _owner(out / "db/table") == (LOCAL_UID, LOCAL_GID)


def test_a_long_owner_name_goes_to_a_pax_record():
    from chunkvault.store import tarformat

    long_name = "u" * 40
    data = tarformat.header(tarformat.REGULAR, b"f", uid=5, gid=6, names=({5: long_name}, {6: "g"})) + tarformat.end(0)
    member = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[0]
    assert (member.uname, member.gname, member.uid, member.gid) == (long_name, "g", 5, 6)


def test_a_snapshot_restored_on_its_own_machine_moves_no_owner(tmp_path, new_repo):
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    snap = repo.backup([str(src)]).snapshot
    assert snap.stats["owners"]["users"][str(os.getuid())] == pwd.getpwuid(os.getuid()).pw_name
    assert not repo.owner_map(snap)


@pytest.mark.parametrize("how", ["forget", "aggregate"])
def test_a_differential_made_a_full_keeps_its_chain_s_names(tmp_path, new_repo, other_machine_names, how):
    """A differential that names nothing (an earlier chunkvault's) takes its chain's names when it becomes
    a full: rebased by a forget of its parent, or aggregated."""
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    full = repo.backup([str(src)]).snapshot
    (src / "g").write_bytes(b"y")
    diff = repo.backup([str(src)], kind="diff").snapshot
    diff.stats.pop("owners")
    repo.store.save_snapshot(diff, replace=True)
    if how == "forget":
        repo.forget([full.id])
    else:
        repo.aggregate(diff.id)
    (made,) = [s for s in repo.snapshots() if s.id == diff.id]
    assert made.kind == "full"
    assert made.stats["owners"] == full.stats["owners"] and made.stats["owners"]["users"]


@needs_root
def test_a_differential_names_an_unchanged_file_s_owner_as_it_is_named_now(tmp_path, new_repo, monkeypatch):
    """uid 4242 was carol's when the full was taken, then carol was deleted and the id given to mallory:
    the differential names it as a full taken then would, whatever file changed."""
    names = {BACKUP_UID: "carol"}
    monkeypatch.setattr(owners, "user_name", names.get)
    repo = new_repo()
    src = _tree(tmp_path)
    full = repo.backup([str(src)]).snapshot
    assert full.stats["owners"]["users"] == {str(BACKUP_UID): "carol"}
    names[BACKUP_UID] = USER
    (src / "mine").write_bytes(b"changed")  # not the file of uid 4242
    diff = repo.backup([str(src)], kind="diff").snapshot
    assert diff.stats["owners"]["users"] == {str(BACKUP_UID): USER}
    repo.restore(diff, str(tmp_path / "out"))
    assert _owner(tmp_path / "out" / "db" / "table")[0] == LOCAL_UID
    del names[BACKUP_UID]  # deleted, no new owner: no name, so a restore keeps the number
    (src / "mine").write_bytes(b"changed again")
    assert repo.backup([str(src)], kind="diff").snapshot.stats["owners"]["users"] == {}


def _user_namespaces() -> bool:
    return subprocess.run(["unshare", "-Ur", "true"], capture_output=True).returncode == 0


@needs_root
@pytest.mark.skipif(not _user_namespaces(), reason="needs user namespaces (unshare -Ur)")
def test_an_owner_that_cannot_be_set_takes_the_set_id_bits_with_it(tmp_path, new_repo, cli):
    """Root in a user namespace cannot give a file to an id outside it: the restore warns, and the file,
    left to the restoring user, must not keep set-user/group-ID bits recorded for another owner."""
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    src = _tree(tmp_path)
    small, big, shared = src / "suid-small", src / "suid-big", src / "shared"
    small.write_bytes(b"#!/bin/sh\n")
    big.write_bytes(os.urandom(3 << 20))
    shared.mkdir()
    for path, mode in ((small, 0o6755), (big, 0o4755), (shared, 0o2775)):
        os.chown(path, BACKUP_UID, BACKUP_GID)
        os.chmod(path, mode)
    repo.backup([str(src)])
    subprocess.run(["chmod", "-R", "a+rwX", str(tmp_path)], check=True)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = "correct horse battery staple"
    proc = subprocess.run(["unshare", "-Ur", sys.executable, "-m", "chunkvault.cli", "restore", "latest",
                           "--target", str(out), "-r", url, "--processes", "1"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # a directory's set-group-ID bit grants nothing (new files there take its group): it stays
    for name, mode in (("suid-small", 0o755), ("suid-big", 0o755), ("shared", 0o2775), ("db", 0o755)):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == mode, name
    assert "suid-small: Invalid argument; restored without its set-user/group-ID bits" in proc.stderr
    assert "shared: Invalid argument\n" in proc.stderr


@needs_root
@pytest.mark.parametrize("processes", [1, 2])
def test_a_restore_as_another_user_keeps_set_id_bits_only_for_that_user(tmp_path, new_repo, monkeypatch, processes):
    """The entries are left to whoever restores them: a set-uid-root file must not come back set-uid for
    that user (GNU tar as another user than root drops the bits too).  The restore runs as root here,
    told it is "nobody": it then sets no owners, as it would as that user."""
    repo = new_repo()
    src = tmp_path / "src"
    (src / "shared").mkdir(parents=True)
    for name, owner in (("root-tool", (0, 0)), ("own-tool", (LOCAL_UID, LOCAL_GID))):
        (src / name).write_bytes(b"#!/bin/sh\n")
        os.chown(src / name, *owner)
        os.chmod(src / name, 0o6755)
    os.chmod(src / "shared", 0o2775)
    snap = repo.backup([str(src)]).snapshot
    monkeypatch.setattr(os, "geteuid", lambda: LOCAL_UID)
    monkeypatch.setattr(os, "getegid", lambda: LOCAL_GID)
    out = tmp_path / "out"
    result = repo.restore(snap, str(out), processes=processes)
    modes = {name: stat.S_IMODE(os.stat(out / name).st_mode) for name in ("root-tool", "own-tool", "shared")}
    assert modes == {"root-tool": 0o755, "own-tool": 0o6755, "shared": 0o2775}  # a directory's grants nothing
    assert ("1 entry restored without their set-user/group-ID bits: recorded for other owners, which only a "
            "restore as root sets") in result.warnings
    report = verify_restore(repo, snap)
    assert report.ok, report.mismatches
    assert any("restored without their set-user/group-ID bits" in w for w in report.warnings)  # the restore's
    # only the bits of other owners may be missing: never one extra, nor one of the restoring user's own
    os.chmod(out / "own-tool", 0o755)
    os.chmod(out / "shared", 0o6775)
    found = compare_tree(repo.tree(snap), out, owners=False)
    assert sorted((m.path, m.kind) for m in found.mismatches) == [("own-tool", "mode"), ("shared", "mode")]


# --- ACL entries name users and groups too ----------------------------------------------------------------


def _acl(*entries):
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ANY = 0xFFFFFFFF


def test_an_acl_s_named_entries_move_with_their_names():
    value = _acl((0x01, 6, ANY), (0x02, 4, 7), (0x02, 5, 8), (0x04, 4, ANY), (0x08, 7, 7), (0x10, 7, ANY),
                 (0x20, 0, ANY))
    assert posix_acl.acl_ids(value) == ({7, 8}, {7})
    moved = posix_acl.mapped_acl(value, {7: 70}, {7: 71})
    assert posix_acl.acl_entries(moved) == [(0x01, 6, ANY), (0x02, 4, 70), (0x02, 5, 8), (0x04, 4, ANY),
                                           (0x08, 7, 71), (0x10, 7, ANY), (0x20, 0, ANY)]
    assert posix_acl.mapped_acl(value, {9: 90}, {}) is value
    assert posix_acl.mapped_acl(b"not an acl", {7: 70}, {}) == b"not an acl"


@needs_root
def test_acl_entries_are_restored_and_dumped_by_name(tmp_path, new_repo, other_machine_names):
    """A grant to the user named nobody on the backed-up machine (uid 4242 there) is a grant to nobody here,
    as tar --acls and borg give it, not to whoever holds 4242 here."""
    repo = new_repo()
    src = tmp_path / "src"
    (src / "shared").mkdir(parents=True)
    (src / "shared" / "f").write_bytes(b"x")
    access = _acl((0x01, 6, ANY), (0x02, 4, BACKUP_UID), (0x04, 4, ANY), (0x10, 4, ANY), (0x20, 0, ANY))
    default = _acl((0x01, 7, ANY), (0x04, 5, ANY), (0x08, 5, BACKUP_GID), (0x10, 5, ANY), (0x20, 0, ANY))
    try:
        os.setxattr(src / "shared" / "f", "system.posix_acl_access", access)
        os.setxattr(src / "shared", "system.posix_acl_default", default)
    except OSError:
        pytest.skip("the test directory's file system keeps no POSIX ACLs")
    snap = repo.backup([str(src)]).snapshot
    assert snap.stats["owners"]["users"][str(BACKUP_UID)] == USER  # named by the ACL alone
    assert snap.stats["owners"]["groups"][str(BACKUP_GID)] == GROUP
    repo.restore(snap, str(tmp_path / "out"), verify=True)
    got = posix_acl.acl_entries(os.getxattr(tmp_path / "out" / "shared" / "f", "system.posix_acl_access"))
    assert (0x02, 4, LOCAL_UID) in got
    got = posix_acl.acl_entries(os.getxattr(tmp_path / "out" / "shared", "system.posix_acl_default"))
    assert (0x08, 5, LOCAL_GID) in got
    repo.restore(snap, str(tmp_path / "numeric"), numeric_owner=True)
    got = posix_acl.acl_entries(os.getxattr(tmp_path / "numeric" / "shared" / "f", "system.posix_acl_access"))
    assert (0x02, 4, BACKUP_UID) in got
    assert verify_restore(repo, snap).ok
    assert verify_restore(repo, snap, owners=False).ok  # the ACLs still compared as the restore mapped them
    os.removexattr(tmp_path / "numeric" / "shared" / "f", "system.posix_acl_access")  # ids mapped here: settable
    found = compare_tree(repo.tree(snap), tmp_path / "numeric", owners=False)
    assert [(m.path, m.kind) for m in found.mismatches] == [("shared/f", "xattrs")]
    assert verify_restore(repo, snap, numeric_owner=True).ok
    from chunkvault.mount import SnapshotFS
    from chunkvault.mountview import Layout

    mounted = f"/snapshots/{Layout(repo.snapshots()).names[snap.id]}/shared/f"
    for fs, uid in ((SnapshotFS(repo), LOCAL_UID), (SnapshotFS(repo, numeric_owner=True), BACKUP_UID)):
        assert (0x02, 4, uid) in posix_acl.acl_entries(fs.getxattr(mounted, "system.posix_acl_access"))
    buf = io.BytesIO()
    repo.dump(snap, "/", buf)
    members = {m.name: m.pax_headers for m in tarfile.open(fileobj=io.BytesIO(buf.getvalue()))}
    assert f"user:{USER}:r--" in members["shared/f"]["SCHILY.acl.access"]
    assert f"group:{GROUP}:r-x" in members["shared"]["SCHILY.acl.default"]


def test_the_mounted_tree_shows_owners_as_a_restore_sets_them(tmp_path, new_repo, other_machine_names):
    if os.geteuid() != 0:
        pytest.skip("gives files to another owner: needs root")
    from chunkvault.mount import SnapshotFS
    from chunkvault.mountview import Layout

    repo = new_repo()
    src = _tree(tmp_path)
    snap = repo.backup([str(src)]).snapshot
    path = f"/snapshots/{Layout(repo.snapshots()).names[snap.id]}/db/table"
    st = SnapshotFS(repo).getattr(path)
    assert (st["st_uid"], st["st_gid"]) == (LOCAL_UID, LOCAL_GID)
    st = SnapshotFS(repo, numeric_owner=True).getattr(path)
    assert (st["st_uid"], st["st_gid"]) == (BACKUP_UID, BACKUP_GID)


@needs_root
@pytest.mark.skipif(not _user_namespaces(), reason="needs user namespaces (unshare -Ur)")
def test_verify_restore_in_a_user_namespace_can_leave_owners_out(tmp_path, new_repo):
    """With the owners left out go what follows them: the set-id bits, and ACLs naming ids outside the
    namespace, which the restore cannot set there."""
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    src = _tree(tmp_path)
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    (src / "shared").mkdir()
    for path, mode in ((src / "tool", 0o4755), (src / "shared", 0o2775)):
        os.chown(path, BACKUP_UID, BACKUP_GID)
        os.chmod(path, mode)
    with contextlib.suppress(OSError):  # where the file system keeps POSIX ACLs
        os.setxattr(src / "mine", "system.posix_acl_access",
                    _acl((0x01, 6, ANY), (0x02, 4, BACKUP_UID), (0x04, 4, ANY), (0x10, 4, ANY), (0x20, 0, ANY)))
    repo.backup([str(src)])
    subprocess.run(["chmod", "-R", "a+rwX", str(tmp_path)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env.update(CHUNKVAULT_PASSWORD="correct horse battery staple", TMPDIR=str(tmp_path))

    def verify(*extra):
        return subprocess.run(["unshare", "-Ur", sys.executable, "-m", "chunkvault.cli", "verify-restore", "-r", url,
                               "--json", *extra], env=env, capture_output=True, text=True)

    owned = verify()
    assert owned.returncode == 18 and '"kind": "owner"' in owned.stdout
    left_out = verify("--ignore-owners")
    assert left_out.returncode == 0, left_out.stdout + left_out.stderr


def test_ls_json_gives_a_name_that_is_not_utf8_in_base64_too():
    from chunkvault.cli import _listed_json

    e = Entry(b"f", T_FILE, uid=7, gid=8)
    listed = _listed_json(e, ({7: os.fsdecode(b"caf\xe9")}, {8: "staff"}))
    assert listed["user"] == "caf\udce9" and listed["user_b64"] == "Y2Fm6Q=="
    assert listed["group"] == "staff" and "group_b64" not in listed
    assert _listed_json(e, ({}, {}))["user"] is None
