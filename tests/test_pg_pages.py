"""PostgreSQL data page checksums checked while ``backup --postgres`` reads relation files: the native check
against its reference, the pages it leaves alone, pages cut across chunks, a page read again, and a real
cluster with a damaged page."""
from __future__ import annotations

import json
import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkvault import _pgpages
from chunkvault.pgpages import PageChecks, checksum, relation_segment

BLOCK = 8192


def page(seed: int, block: int, *, lsn: int = 0x10_0000_0000, upper: int = 4000, size: int = BLOCK) -> bytes:
    """A page with random contents, the given LSN and pd_upper, and the checksum PostgreSQL would store."""
    rnd = random.Random(seed)
    body = bytearray(rnd.randbytes(size))
    struct.pack_into("=IIHHHH", body, 0, lsn >> 32, lsn & 0xFFFFFFFF, 0, 0, 24, upper)
    struct.pack_into("=H", body, 8, checksum(bytes(body), block))
    return bytes(body)


def damaged(p: bytes, at: int = 300) -> bytes:
    b = bytearray(p)
    b[at] ^= 0x40
    return bytes(b)


@settings(max_examples=60)
@given(st.integers(0, 2**64), st.integers(0, 2**32 - 1))
def test_the_native_checksum_is_the_reference(seed, block):
    data = random.Random(seed).randbytes(BLOCK)
    assert _pgpages.checksum(data, block) == checksum(data, block)


@given(st.sampled_from([1024, 2048, 4096, 16384, 32768]), st.integers(0, 1000))
def test_other_block_sizes_check_as_their_reference(size, seed):
    p = page(seed, 7, size=size)
    assert _pgpages.checksum(p, 7) == checksum(p, 7) and _pgpages.bad_pages(p, size, 7, 2**64 - 1) == []
    assert _pgpages.bad_pages(damaged(p), size, 7, 2**64 - 1) == [0]


def test_a_page_checks_only_as_its_own_block():
    p = page(1, 5)
    assert _pgpages.bad_pages(p, BLOCK, 5, 2**64 - 1) == [] and _pgpages.bad_pages(p, BLOCK, 6, 2**64 - 1) == [0]


def test_new_pages_pages_changed_since_the_start_and_a_partial_page_are_left_alone():
    new = bytes(BLOCK)
    garbage_new = b"\1" * 14 + b"\0\0" + b"\1" * (BLOCK - 16)  # pd_upper 0: PostgreSQL never wrote it
    late = damaged(page(2, 2, lsn=0x20_0000_0000))  # written after the start: WAL replay rewrites it
    bad = damaged(page(3, 3))
    data = new + garbage_new + late + bad + bad[:100]
    assert _pgpages.bad_pages(data, BLOCK, 0, 0x20_0000_0000) == [3]
    assert _pgpages.bad_pages(data, BLOCK, 0, 0x20_0000_0001) == [2, 3]


@pytest.mark.parametrize("size", [0, 100, 8000, 8200])
def test_a_block_size_the_algorithm_does_not_take_is_refused(size):
    with pytest.raises(ValueError):
        _pgpages.bad_pages(bytes(8192), size, 0, 0)
    with pytest.raises(ValueError):
        _pgpages.checksum(bytes(size), 0)


@pytest.mark.parametrize("rel, segment", [
    (b"base/5/16384", 0), (b"base/5/16384.3", 3), (b"base/5/16384_fsm", 0), (b"base/5/16384_vm.1", 1),
    (b"global/1262", 0), (b"pg_tblspc/16390/PG_15_202209061/5/16391.2", 2),
    (b"chunkvault_tblspc/16390/PG_15_202209061/5/16391", 0), (b"chunkvault_tblspc/16390/PG_15_202209061/5", None),
    (b"global/pg_control", None), (b"global/pg_filenode.map", None), (b"base/5/PG_VERSION", None),
    (b"base/5/pg_internal.init", None), (b"pg_wal/000000010000000000000001", None), (b"PG_VERSION", None),
    (b"base/5/t3_16384", None), (b"pg_xact/0000", None), (b"base/pgsql_tmp/x", None),
])
def test_the_files_whose_pages_carry_checksums(rel, segment):
    assert relation_segment(rel) == segment


def relation(tmp_path, pages: list[bytes], rel: str = "base/5/16384.1") -> tuple[PageChecks, bytes]:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(pages))
    return PageChecks(lambda r: os.path.join(bytes(tmp_path), r), BLOCK, 4, 0x18_0000_0000), rel.encode()


@given(st.lists(st.integers(1, 3 * BLOCK), max_size=12), st.sets(st.integers(0, 7)))
@settings(max_examples=40, deadline=None)
def test_pages_cut_across_chunks_anywhere_are_checked_once_each(tmp_path_factory, cuts, broken):
    """Segment 1 of a relation of 4-block segments: its pages are blocks 4 to 11 of the relation."""
    pages = [damaged(page(i, 4 + i)) if i in broken else page(i, 4 + i) for i in range(8)]
    checks, rel = relation(tmp_path_factory.mktemp("rel"), pages)
    data = b"".join(pages)
    f = checks.for_file(rel)
    pos = 0
    for n in cuts:
        f.feed(data[pos:pos + n])
        pos = min(len(data), pos + n)
    f.feed(data[pos:])
    f.finish()
    assert checks.pages == 8
    assert checks.failures == ({"base/5/16384.1": sorted(broken)} if broken else {})


def test_a_page_that_reads_right_the_second_time_is_no_failure(tmp_path):
    """Read half-written the first time (the file on disk holds it whole): not reported."""
    pages = [page(i, 4 + i) for i in range(3)]
    checks, rel = relation(tmp_path, pages)
    f = checks.for_file(rel)
    f.feed(pages[0] + damaged(pages[1]) + damaged(pages[2]))
    (tmp_path / "base/5/16384.1").write_bytes(pages[0] + pages[1] + damaged(pages[2]))
    f.finish()
    assert checks.failures == {"base/5/16384.1": [2]} and checks.pages == 3
    said = checks.warnings()
    assert said == ["invalid page checksum in base/5/16384.1: block(s) 2 (the server's copy is damaged too: see "
                    "PostgreSQL's log and its storage)"]
    assert checks.to_dict() == {"pages": 3, "failures": [{"path": "base/5/16384.1", "blocks": [2]}]}


def test_a_file_gone_before_its_pages_are_read_again_reports_nothing(tmp_path):
    pages = [damaged(page(0, 4))]
    checks, rel = relation(tmp_path, pages)
    f = checks.for_file(rel)
    f.feed(pages[0])
    os.unlink(tmp_path / "base/5/16384.1")
    f.finish()
    assert checks.failures == {} and checks.pages == 1


def test_many_failed_blocks_are_named_up_to_ten(tmp_path):
    pages = [damaged(page(i, 4 + i)) for i in range(13)]
    checks, rel = relation(tmp_path, pages)
    f = checks.for_file(rel)
    f.feed(b"".join(pages))
    f.finish()
    assert "block(s) 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 3 more" in checks.warnings()[0]


@pytest.mark.slow
def test_a_damaged_page_of_a_running_cluster_is_reported_and_the_snapshot_still_saved(tmp_path, new_repo, cli,
                                                                                       monkeypatch):
    import servers_pg

    bindir = servers_pg.require_postgres()
    with servers_pg.PgCluster(bindir) as c:
        c.init(data_checksums=True)
        c.start()
        c.create_tablespace("ts1", os.path.join(c.base, "ts1"))
        c.sql("create table t as select g, md5(g::text) m from generate_series(1, 20000) g; "
              "create table u tablespace ts1 as select g from generate_series(1, 20000) g; checkpoint")
        rel = c.sql("select pg_relation_filepath('t')")
        in_ts = c.sql("select pg_relation_filepath('u')")  # pg_tblspc/OID/PG_15_.../5/NNNN
        tree_ts = "chunkvault_tblspc/" + in_ts.split("/", 1)[1]  # where the snapshot holds it
        env = {"PGHOST": c.rundir, "PGPORT": str(c.port), "PGUSER": "postgres", "PGDATABASE": "postgres",
               "PATH": f"{bindir}:{os.environ['PATH']}"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        repo = new_repo(str(tmp_path / "repo"))
        clean = repo.backup([c.datadir], postgres="")
        checked = clean.snapshot.stats["postgres"]["page_checksums"]
        assert checked["failures"] == [] and checked["pages"] > 160  # the table's 167 pages and the catalogs'
        assert not any("page checksum" in w for w in clean.warnings)

        c.stop()
        for name, block in ((rel, 3), (in_ts, 5)):  # a bit flipped on disk, under PostgreSQL's back
            with open(os.path.join(c.datadir, name), "r+b") as f:
                f.seek(block * BLOCK + 4000)
                byte = f.read(1)
                f.seek(block * BLOCK + 4000)
                f.write(bytes([byte[0] ^ 0x10]))
        c.start()  # on another port
        env["PGPORT"] = str(c.port)
        out = cli("backup", "-r", str(tmp_path / "repo"), "--postgres", c.datadir, "--json", env=env)
        doc = json.loads(out.stdout)
        said = [w for w in doc["warnings"] if "page checksum" in w]
        assert said == [f"invalid page checksum in {name}: block(s) {block} (the server's copy is damaged too: see "
                        "PostgreSQL's log and its storage)" for name, block in sorted(((rel, 3), (tree_ts, 5)))
                        ], doc["warnings"]
        stats = repo.snapshot(doc["id"]).stats["postgres"]["page_checksums"]
        assert stats["failures"] == sorted([{"path": rel, "blocks": [3]}, {"path": tree_ts, "blocks": [5]}],
                                           key=lambda f: f["path"])
        assert stats["pages"] >= 167 + 89  # both tables' pages at least


@pytest.mark.slow
def test_a_tablespace_inside_the_data_directory_is_checked_and_its_unlogged_relations_left_out(tmp_path, new_repo,
                                                                                             monkeypatch):
    """A tablespace made inside the data directory is read where it lies (``<dir>/PG_15_.../<db>/<node>``):
    its pages were not checked, nor its unlogged relations' forks left out, the path being no ``pg_tblspc``'s."""
    import servers_pg

    bindir = servers_pg.require_postgres()
    with servers_pg.PgCluster(bindir) as c:
        c.init(data_checksums=True)
        c.start()
        c.create_tablespace("its", os.path.join(c.datadir, "inside_ts"))
        c.sql("create table u tablespace its as select g from generate_series(1, 20000) g; "
              "create unlogged table ul tablespace its as select g from generate_series(1, 20000) g; checkpoint")
        tree = "inside_ts/" + c.sql("select pg_relation_filepath('u')").split("/", 2)[2]  # PG_15_.../5/NNNN
        unlogged = "inside_ts/" + c.sql("select pg_relation_filepath('ul')").split("/", 2)[2]
        c.stop()
        with open(os.path.join(c.datadir, tree), "r+b") as f:
            f.seek(3 * BLOCK + 4000)
            byte = f.read(1)
            f.seek(3 * BLOCK + 4000)
            f.write(bytes([byte[0] ^ 0x10]))
        c.start()
        for k, v in {"PGHOST": c.rundir, "PGPORT": str(c.port), "PGUSER": "postgres", "PGDATABASE": "postgres",
                     "PATH": f"{bindir}:{os.environ['PATH']}"}.items():
            monkeypatch.setenv(k, v)
        repo = new_repo(str(tmp_path / "repo"))
        done = repo.backup([c.datadir], postgres="")
        assert done.snapshot.stats["postgres"]["page_checksums"]["failures"] == [{"path": tree, "blocks": [3]}]
        held = {r.path.decode() for r in repo.tree(done.snapshot) if r.path.startswith(b"inside_ts/")}
        assert unlogged + "_init" in held and unlogged not in held and tree in held
