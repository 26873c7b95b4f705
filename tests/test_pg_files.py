"""What a backup --postgres leaves out of a database directory, as pg_basebackup does (no server needed)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chunkvault.pgbackup import is_database_directory, unlogged_and_temporary


def test_every_fork_of_an_unlogged_relation_but_its_init_fork_and_temporary_relations_are_left_out():
    names = [b"16384", b"16384_init", b"16384_fsm", b"16384_vm", b"16384.1", b"16385", b"16385_fsm", b"16385.2",
             b"t3_16390", b"t3_16390_fsm", b"t3_16390.2", b"t12_7_vm", b"PG_VERSION", b"pg_filenode.map",
             b"pg_internal.init", b"1638", b"16384x", b"16384_init.tmp", b"tx_1", b"t3_", b"16384_foo"]
    assert unlogged_and_temporary(names) == {b"16384", b"16384_fsm", b"16384_vm", b"16384.1", b"t3_16390",
                                             b"t3_16390_fsm", b"t3_16390.2", b"t12_7_vm"}
    assert unlogged_and_temporary([b"16384", b"16384_vm"]) == set()  # logged: no init fork beside it
    assert unlogged_and_temporary([b"16384_init"]) == set()


FORKS = st.sampled_from([b"", b"_fsm", b"_vm", b"_init"])
SEGMENTS = st.sampled_from([b"", b".1", b".12"])


@given(st.lists(st.tuples(st.integers(1, 40), FORKS, SEGMENTS), max_size=30))
def test_what_is_left_out_is_exactly_the_non_init_forks_of_relations_with_an_init_fork(files):
    names = sorted({b"%d%s%s" % f for f in files})
    gone = unlogged_and_temporary(names)
    inits = {oid for oid, fork, _ in files if fork == b"_init"}
    for oid, fork, segment in files:
        name = b"%d%s%s" % (oid, fork, segment)
        assert (name in gone) == (oid in inits and fork != b"_init")


def test_database_directories():
    assert is_database_directory(b"base/5") and is_database_directory(b"pg_tblspc/16400/PG_15_202209061/5")
    for other in (b"", b"base", b"global", b"base/5/x", b"base/pgsql_tmp", b"pg_tblspc/16400/PG_15_202209061",
                  b"pg_tblspc/16400/other/5", b"pg_wal/5"):
        assert not is_database_directory(other)


def test_the_start_segment_a_snapshots_stats_record_and_what_does_not_count_as_one():
    from chunkvault.store.walnames import stats_start_segment

    start = "000000010000000000000002"
    assert stats_start_segment({"postgres": {"start_wal": start, "timeline": 1}}) == start
    for stats in ({}, {"postgres": None}, {"postgres": "x"}, {"postgres": {"wal": [start]}},
                  {"postgres": {"start_wal": "00000001000000000000000a"}}, {"postgres": {"start_wal": 2}},
                  {"postgres": {"start_wal": start + ".partial"}}, {"postgres": {"start_wal": start[:-1]}}):
        assert stats_start_segment(stats) is None  # its label is read instead
