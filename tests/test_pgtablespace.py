"""Tablespaces in backup --postgres and their places in a restore: the parts that need no server."""
from __future__ import annotations

import dataclasses
import os
import struct

import pytest

from chunkvault import pgbackup
from chunkvault.errors import UsageError
from chunkvault.pgbackup import PostgresOnline, catalog_version, changed_tablespaces, version_directory
from chunkvault.pgsession import BackupStart, Tablespace
from chunkvault.pgtablespace import held_at, parse_mapping, recorded_tablespaces, relocations
from chunkvault.store.manifest import T_DIR, T_FILE, T_SYMLINK
from chunkvault.store.restore import Relocation
from chunkvault.store.source import SourceWalk


def test_the_version_directory_and_the_catalog_version_pg_control_records(tmp_path):
    assert version_directory(150004, 202209061) == b"PG_15_202209061"
    assert version_directory(100023, 201707211) == b"PG_10_201707211"
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "pg_control").write_bytes(struct.pack("=QII", 7, 1300, 202209061) + bytes(100))
    assert catalog_version(str(tmp_path)) == 202209061
    (tmp_path / "global" / "pg_control").write_bytes(b"short")
    with pytest.raises(pgbackup.SourceCommandFailed, match="cut short"):
        catalog_version(str(tmp_path))


def test_what_changed_among_the_tablespaces_is_said_in_words():
    a, b = Tablespace(16384, "a", "/a"), Tablespace(16385, "b", "/b")
    assert changed_tablespaces([a, b], [b, a]) is None
    assert changed_tablespaces([a], [a, b]) == "b created"
    assert changed_tablespaces([a, b], [b]) == "a dropped"
    assert changed_tablespaces([a], [Tablespace(16384, "a", "/elsewhere")]) == "a moved"
    assert Tablespace(1, "x", "/x").outside and not Tablespace(1, "x", "pg_tblspc/1").outside


def test_a_tablespace_outside_is_walked_under_chunkvault_tblspc_and_its_link_recorded_anew(tmp_path):
    """The walk a backup --postgres makes, without a server: the location's current version directory alone
    under ``chunkvault_tblspc/<oid>``; the link left out of ``pg_tblspc``, for the appendix to record as a
    relative link; a tablespace inside the data directory read where it lies, its link made relative."""
    data, location = tmp_path / "data", tmp_path / "ts"
    for d in ("global", "pg_tblspc", "base/1", "inner/PG_15_7"):
        (data / d).mkdir(parents=True)
    (data / "global" / "pg_control").write_bytes(struct.pack("=QII", 7, 1300, 7) + bytes(100))
    for d in ("PG_15_7/5", "PG_9.6_201608131/5"):
        (location / d).mkdir(parents=True)
    (location / "PG_15_7" / "5" / "16390").write_bytes(b"rows")
    (location / "PG_15_7" / "5" / "16391_init").write_bytes(b"")
    (location / "PG_15_7" / "5" / "16391").write_bytes(b"unlogged")
    (location / "PG_9.6_201608131" / "5" / "1").write_bytes(b"old")
    os.symlink(location, data / "pg_tblspc" / "16384")
    os.symlink(data / "inner", data / "pg_tblspc" / "16385")

    class Session:
        def start(self, label, fast, accept):
            accept(str(data))
            return BackupStart(0x2000028, str(data), 150000, 16 << 20,
                               [Tablespace(16384, "ts", str(location)), Tablespace(16385, "in", str(data / "inner"))])

        def query(self, sql):  # the page settings: data checksums on
            return [["on", "8192", "131072"]]

    online = PostgresOnline(str(data))
    online._session = Session()
    online.begin()
    walk = SourceWalk([(b"", bytes(data))], leave_out=online.leave_out, graft=online.graft)
    got = {rel: path for rel, path, _, _ in walk}
    held = [r for r in got if b"tblspc" in r]
    assert held == [b"chunkvault_tblspc", b"chunkvault_tblspc/16384", b"chunkvault_tblspc/16384/PG_15_7",
                    b"chunkvault_tblspc/16384/PG_15_7/5", b"chunkvault_tblspc/16384/PG_15_7/5/16390",
                    b"chunkvault_tblspc/16384/PG_15_7/5/16391_init", b"pg_tblspc"]  # not 16391, nor the links
    assert got[b"chunkvault_tblspc/16384/PG_15_7/5/16390"] == bytes(location / "PG_15_7" / "5" / "16390")
    assert online._links == {b"16384": b"../chunkvault_tblspc/16384", b"16385": b"../inner"}
    assert b"inner/PG_15_7" in got
    checked = online.inspector(b"chunkvault_tblspc/16384/PG_15_7/5/16390")  # read again through the link
    assert checked is not None and online._path_of(checked.rel) == bytes(data / "pg_tblspc/16384/PG_15_7/5/16390")


def test_the_mapping_of_a_tablespace_and_where_the_tree_holds_it():
    assert parse_mapping("ts1=/srv/ts1") == ("ts1", "/srv/ts1")
    assert parse_mapping("16384=/a=b") == ("16384", "/a=b")
    for bad in ("ts1", "=/x", "ts1="):
        with pytest.raises(UsageError, match="OID_OR_NAME=DIR"):
            parse_mapping(bad)
    link = b"pg_tblspc/16384"
    assert held_at(link, T_SYMLINK, b"../chunkvault_tblspc/16384") == b"chunkvault_tblspc/16384"
    assert held_at(link, T_DIR, b"") == link  # made in place
    assert held_at(link, T_SYMLINK, b"/srv/ts1") == b""  # outside the tree
    assert held_at(link, T_SYMLINK, b"../../elsewhere") == b""
    assert held_at(link, T_FILE, b"") == b""


@pytest.fixture
def snapshot_with_tablespaces(tmp_path, new_repo):
    """A tree laid out as backup --postgres lays a tablespace out, backed up as files, and its snapshot with
    the stats such a backup records."""
    data = tmp_path / "data"
    (data / "chunkvault_tblspc" / "16384" / "PG_15_7" / "5").mkdir(parents=True)
    (data / "chunkvault_tblspc" / "16384" / "PG_15_7" / "5" / "16390").write_bytes(b"rows" * 1000)
    (data / "pg_tblspc").mkdir()
    (data / "base").mkdir()
    (data / "base" / "f").write_bytes(b"base")
    os.symlink("../chunkvault_tblspc/16384", data / "pg_tblspc" / "16384")
    repo = new_repo()
    snap = repo.backup([str(data)]).snapshot
    pg = {"tablespaces": [{"oid": 16384, "name": "ts1", "location": "/srv/ts1"}]}
    return repo, snap, dataclasses.replace(snap, stats={**snap.stats, "postgres": pg})


def test_relocations_name_a_tablespace_by_oid_or_name_and_refuse_what_is_not_there(snapshot_with_tablespaces,
                                                                                    tmp_path):
    repo, plain, snap = snapshot_with_tablespaces
    into = str(tmp_path / "ts")
    expected = [Relocation(b"chunkvault_tblspc/16384", into, b"pg_tblspc/16384")]
    assert relocations(repo, snap, [f"ts1={into}"]) == relocations(repo, snap, [f"16384={into}"]) == expected
    assert relocations(repo, snap, []) == []
    with pytest.raises(UsageError, match="not one of backup --postgres"):
        relocations(repo, plain, [f"ts1={into}"])
    with pytest.raises(UsageError, match=r"has no tablespace 'ts2' \(its tablespaces: ts1 \(oid 16384\)\)"):
        relocations(repo, snap, [f"ts2={into}"])
    with pytest.raises(UsageError, match="placed twice"):
        relocations(repo, snap, [f"ts1={into}", f"16384={into}2"])
    assert recorded_tablespaces(dataclasses.replace(snap, stats={"postgres": {}})) == []  # an older snapshot's


def test_a_relocated_directory_is_restored_into_its_own_directory_and_linked(snapshot_with_tablespaces, tmp_path):
    repo, _, snap = snapshot_with_tablespaces
    target, into = tmp_path / "target", tmp_path / "ts"
    [r] = relocations(repo, snap, [f"ts1={into}"])
    counted = []
    result = repo.restore(snap.id, str(target), relocate=[r], progress=lambda f, b: counted.append((f, b)),
                          verify=True)
    assert os.readlink(target / "pg_tblspc" / "16384") == str(into)
    assert (into / "PG_15_7" / "5" / "16390").read_bytes() == b"rows" * 1000
    assert (target / "base" / "f").read_bytes() == b"base"
    assert os.listdir(target / "chunkvault_tblspc") == []
    assert result.files == 2 and counted[-1] == (2, 4004) and result.snapshot == snap.id
    with pytest.raises(UsageError, match="is not empty"):
        repo.restore(snap.id, str(tmp_path / "t2"), relocate=[r])
    with pytest.raises(UsageError, match="overlaps"):
        repo.restore(snap.id, str(tmp_path / "t3"), relocate=[Relocation(r.subtree, str(tmp_path / "t3" / "x"),
                                                                        r.link)])
    with pytest.raises(UsageError, match="give no subtree, includes or excludes"):
        repo.restore(snap.id, str(tmp_path / "t4"), relocate=[r], includes=["base"])
    with pytest.raises(UsageError, match="is not a directory of snapshot"):
        repo.restore(snap.id, str(tmp_path / "t5"), relocate=[Relocation(b"base/f", str(tmp_path / "d5"), r.link)])
    os.mkfifo(tmp_path / "fifo")
    for other in (tmp_path / "fifo", "/dev/null"):  # refused once the target's own part was restored
        with pytest.raises(UsageError, match="is not a directory: the tablespace cannot be restored into it"):
            repo.restore(snap.id, str(tmp_path / "t6"), relocate=[Relocation(r.subtree, str(other), r.link)])
    assert not any(os.path.exists(tmp_path / n) for n in ("t2", "t3", "t4", "t5", "d5", "t6"))
    result = repo.restore(snap.id, str(target), relocate=[r], force=True, delta=True, verify=True)
    assert result.unchanged_files == 2 and os.readlink(target / "pg_tblspc" / "16384") == str(into)


def test_the_command_line_refuses_a_mapping_it_cannot_make(tmp_path, new_repo, cli):
    data = tmp_path / "data"
    (data / "base").mkdir(parents=True)
    (data / "base" / "f").write_bytes(b"x")
    url = str(tmp_path / "repo")
    new_repo(url).backup([str(data)])
    target = str(tmp_path / "target")
    for extra, said in [(["--include", "base"], "give no SNAPSHOT:PATH, --include or --exclude"),
                        ([], "not one of backup --postgres"),
                        (["--from-file", str(tmp_path / "x.backup")], "not --from-file")]:
        err = cli("restore", "-r", url, "latest", "--target", target, "--pg-tablespace", "ts1=/x", *extra,
                  check=2).stderr.decode()
        assert said in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(target)


@pytest.mark.parametrize("swapped", ["parent", "place"])
def test_a_link_or_directory_swapped_in_while_the_restore_ran_does_not_lead_the_tablespace_link_out(
        snapshot_with_tablespaces, tmp_path, swapped):
    """The link to a relocated tablespace was made by path once the files were in: pg_tblspc swapped meanwhile for
    a symbolic link to /etc, say, had a restore run as root remove /etc/16384 and put its link there.  Now the
    link is made through the descriptor of its directory, reached within the target, under a name of its own and
    renamed into place; what cannot be made so is one line (TargetUnwritable), nothing outside touched."""
    from chunkvault.errors import TargetUnwritable

    repo, _, snap = snapshot_with_tablespaces
    target, into, outside = tmp_path / "target", tmp_path / "ts", tmp_path / "outside"
    outside.mkdir()
    (outside / "16384").write_text("not the restore's")
    [r] = relocations(repo, snap, [f"ts1={into}"])

    def step(files, nbytes):
        if files == 2 and not (target / "pg_tblspc.aside").exists():  # the tablespace's own part is in
            if swapped == "parent":
                os.rename(target / "pg_tblspc", target / "pg_tblspc.aside")
                os.symlink(outside, target / "pg_tblspc")
            else:
                (target / "pg_tblspc.aside").mkdir()
                os.unlink(target / "pg_tblspc" / "16384")  # the snapshot's link, restored
                (target / "pg_tblspc" / "16384").mkdir()
                (target / "pg_tblspc" / "16384" / "theirs").write_text("")

    said = "leads pg_tblspc out of the target" if swapped == "parent" else "pg_tblspc/16384"
    with pytest.raises(TargetUnwritable, match=said) as caught:
        repo.restore(snap.id, str(target), relocate=[r], progress=step, processes=1)
    assert "\n" not in str(caught.value) and caught.value.partial.files == 2
    assert sorted(os.listdir(outside)) == ["16384"] and (outside / "16384").read_text() == "not the restore's"
    assert (into / "PG_15_7" / "5" / "16390").read_bytes() == b"rows" * 1000
