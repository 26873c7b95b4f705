"""Tablespaces in backup --postgres and their places in a restore: the parts that need no server."""
from __future__ import annotations

import os
import struct

import pytest

from chunkvault import pgbackup
from chunkvault.pgbackup import PostgresOnline, catalog_version, changed_tablespaces, version_directory
from chunkvault.pgsession import BackupStart, Tablespace
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
        def start(self, label, fast):
            return BackupStart(0x2000028, str(data), 150000, 16 << 20,
                               [Tablespace(16384, "ts", str(location)), Tablespace(16385, "in", str(data / "inner"))])

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
