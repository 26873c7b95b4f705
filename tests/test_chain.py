"""Chain resolution against an obviously-correct dict model."""
from hypothesis import given, settings, strategies as st

import pytest

from chunkvault.store import chain as chain_module
from chunkvault.store.chain import ancestors, apply, chain_to_base, compose, lineage, lookup, on_way_to, resolve
from chunkvault.store.manifest import (
    OP_DELETE, OP_ENTRY, OP_FRESH, T_FILE, Entry, Record, sort_key,
)

NAMES = [b"a", b"b", b"a.b", b"a-", b"c"]
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(b"/".join)


def entry(path: bytes, v: int) -> Entry:
    return Entry(path, T_FILE, size=v)


@st.composite
def full_trees(draw):
    ps = draw(st.sets(paths, max_size=12))
    return {p: draw(st.integers(0, 9)) for p in ps}


@st.composite
def diffs(draw):
    ps = draw(st.sets(paths, max_size=8))
    recs = []
    for p in sorted(ps, key=sort_key):
        op = draw(st.sampled_from([OP_ENTRY, OP_FRESH, OP_DELETE]))
        recs.append(Record(op, p, None if op == OP_DELETE else entry(p, draw(st.integers(0, 9)))))
    return recs


def as_records(tree):
    return [Record(OP_ENTRY, p, entry(p, v)) for p, v in sorted(tree.items(), key=lambda kv: sort_key(kv[0]))]


def model_apply(tree, diff):
    tree = dict(tree)
    for rec in diff:
        if rec.op in (OP_DELETE, OP_FRESH):
            for p in [p for p in tree if p == rec.path or p.startswith(rec.path + b"/")]:
                del tree[p]
        if rec.op != OP_DELETE:
            tree[rec.path] = rec.entry.size
    return tree


def as_tree(records):
    out = {}
    keys = []
    for r in records:
        assert r.op == OP_ENTRY
        assert r.path not in out
        out[r.path] = r.entry.size
        keys.append(sort_key(r.path))
    assert keys == sorted(keys)
    return out


@settings(max_examples=400)
@given(full_trees(), diffs())
def test_apply_matches_model(tree, diff):
    assert as_tree(apply(as_records(tree), diff)) == model_apply(tree, diff)


@settings(max_examples=400)
@given(full_trees(), st.lists(diffs(), max_size=9))
def test_resolve_matches_model(tree, chain):
    expected = tree
    for d in chain:
        expected = model_apply(expected, d)
    assert as_tree(resolve(as_records(tree), chain)) == expected


@settings(max_examples=400)
@given(full_trees(), diffs(), diffs())
def test_compose_equals_sequential_apply(tree, d1, d2):
    composed = list(compose(d1, d2))
    keys = [sort_key(r.path) for r in composed]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert as_tree(apply(as_records(tree), composed)) == model_apply(model_apply(tree, d1), d2)


needs_c_merge = pytest.mark.skipif(chain_module._MergeC is None, reason="the C extension is not built")


def c_merge(lower, upper, lower_is_full):
    return chain_module._MergeC(lower, upper, lower_is_full, Record, OP_ENTRY, OP_FRESH, OP_DELETE)


@needs_c_merge
@settings(max_examples=600)
@given(st.one_of(full_trees().map(as_records), diffs()), diffs(), st.booleans())
def test_c_merge_yields_what_the_python_merge_yields(lower, upper, lower_is_full):
    """The same records, in order, the same objects where the reference passes a record through."""
    ref = list(chain_module._merge_reference(lower, upper, lower_is_full))
    got = list(c_merge(lower, upper, lower_is_full))
    assert got == ref
    assert [type(r) for r in got] == [Record] * len(ref)
    assert [r.entry is q.entry for r, q in zip(got, ref)] == [True] * len(ref)


@needs_c_merge
def test_c_merge_reads_its_inputs_as_lazily_as_the_generator():
    """A manifest that fails part-way fails at the same record either way (a backup reads the head of
    its parent's tree to decide whether the chain is readable)."""
    def failing(records, after):
        yield from records[:after]
        raise ValueError("damaged")

    lower = as_records({b"a": 1, b"b": 2, b"c": 3})
    upper = [Record(OP_FRESH, b"b", entry(b"b", 5))]
    for after in range(len(lower) + 1):
        for merge in (chain_module._merge_reference, c_merge):
            it = merge(failing(lower, after), iter(upper), True)
            got = []
            with pytest.raises(ValueError, match="damaged"):
                while True:
                    got.append(next(it))
            assert [r.path for r in got] == [r.path for r in chain_module._merge_reference(lower[:after], upper, True)][:len(got)]
            if merge is c_merge:
                assert len(got) == expected_len
            else:
                expected_len = len(got)


@needs_c_merge
def test_c_merge_refuses_what_is_not_a_record():
    with pytest.raises(TypeError, match="records"):
        list(c_merge([(OP_ENTRY, "a", None)], [], True))
    with pytest.raises(TypeError, match="records"):
        list(c_merge([], [object()], False))


def test_chain_to_base():
    parents = {"f": None, "d1": "f", "d2": "d1"}
    assert chain_to_base("d2", parents) == ["f", "d1", "d2"]
    assert chain_to_base("f", parents) == ["f"]
    try:
        chain_to_base("x", {"x": "gone"})
    except KeyError as exc:
        assert exc.args[0] == "gone"
    else:
        raise AssertionError("broken chain not detected")


def _layer(records):
    by_path = {r.path: r for r in records}
    return by_path.get


@settings(max_examples=400)
@given(full_trees(), st.lists(diffs(), max_size=5), paths)
def test_lookup_of_one_path_matches_resolve(tree, chain, probe):
    layers = [as_records(tree)] + chain
    expected = as_tree(resolve(layers[0], layers[1:]))
    for path in [probe, *expected]:
        got = lookup(path, [_layer(recs) for recs in layers])
        if path in expected:
            assert got is not None and got.op == OP_ENTRY and got.entry.size == expected[path]
        else:
            assert got is None


@settings(max_examples=400)
@given(full_trees(), st.lists(diffs(), max_size=5), paths)
def test_resolving_the_records_on_the_way_to_a_directory_gives_the_tree_s(tree, chain, directory):
    """What ``tree_within`` relies on: each layer's records of the paths on the way to a directory (above
    it, it, below it) resolve to the resolved tree's records of those paths."""
    layers = [as_records(tree)] + chain
    near = [[r for r in layer if on_way_to(r.path, directory)] for layer in layers]
    expected = {p: v for p, v in as_tree(resolve(layers[0], layers[1:])).items() if on_way_to(p, directory)}
    assert as_tree(resolve(near[0], near[1:])) == expected


def test_on_way_to():
    assert [p for p in [b"", b"a", b"a/b", b"a/b/c", b"a/b/c/d", b"a/bc", b"a/b.c", b"a/x", b"b"]
            if on_way_to(p, b"a/b")] == [b"", b"a", b"a/b", b"a/b/c", b"a/b/c/d"]


def test_ancestors():
    assert ancestors(b"a/b/c") == [b"a", b"a/b"]
    assert ancestors(b"top") == []


def test_lineage_walks_up_to_a_missing_parent_or_a_cycle_without_raising():
    parents = {"f": None, "d1": "f", "d2": "d1", "o": "gone", "x": "y", "y": "x"}
    assert lineage("d2", parents) == ["d2", "d1", "f"]
    assert lineage("f", parents) == ["f"]
    assert lineage("o", parents) == ["o"]
    assert lineage("x", parents) == ["x", "y"]


@settings(max_examples=300)
@given(st.data())
def test_children_first_leaves_no_orphan_at_any_point(data):
    """Deleting snapshots in ``children_first`` order, stopped after any number of them: no snapshot still
    there, of those to delete, has its parent gone (those kept were rebased off them beforehand)."""
    from chunkvault.store.chain import children_first

    n = data.draw(st.integers(1, 12))
    parents: dict = {}
    for i in range(n):  # each a full, or a differential on an earlier snapshot
        parents[f"s{i}"] = data.draw(st.one_of(st.none(), st.sampled_from([f"s{j}" for j in range(i)] or [None])))
    going = data.draw(st.lists(st.sampled_from(sorted(parents)), unique=True))
    order = children_first(going, parents)
    assert sorted(order) == sorted(going)
    for k in range(len(order) + 1):
        gone = set(order[:k])
        assert not any(parents[s] in gone for s in order[k:])



@st.composite
def forests(draw):
    """Parent maps of snapshot chains: each a full (None), a differential of an earlier one, or of one that
    is not there (a chain cut off)."""
    parents: dict[str, str | None] = {}
    for i in range(draw(st.integers(0, 40))):
        choice = draw(st.integers(-2, i - 1))
        parents[f"s{i}"] = None if choice == -1 else "gone" if choice == -2 else f"s{choice}"
    return parents


@given(forests(), st.sets(st.integers(0, 39), max_size=5))
def test_folds_over_chains_answer_as_each_lineage_does(parents, numbers):
    """One pass over every chain: asked lineage by lineage, a chain of 3,000 differentials took minutes."""
    from chunkvault.store.chain import chain_lengths, children_first, meets, with_ancestors
    from chunkvault.store.find import chain_order
    from chunkvault.store.snapshot import Snapshot

    picked = {f"s{n}" for n in numbers}
    lines = {sid: lineage(sid, parents) for sid in parents}
    assert chain_lengths(parents) == {sid: len(line) for sid, line in lines.items()}
    assert meets(parents, picked) == {sid: not picked.isdisjoint(line) for sid, line in lines.items()}
    chosen = [sid for sid in parents if sid in picked]
    assert with_ancestors(chosen, parents) == {a for sid in chosen for a in lines[sid]}
    order = children_first(list(parents), parents)
    assert all(order.index(a) > order.index(sid) for sid, line in lines.items() for a in line[1:])
    snaps = [Snapshot(time="2026-01-01T00:00:00Z", kind="diff" if p else "full", parent=p, host="h", paths=["/"],
                      tags=[], manifest=[], manifest_starts=[], stdin_name=None, stats={}, id=sid)
             for sid, p in parents.items()]
    expected = sorted((sid for sid, line in lines.items() if parents[line[-1]] is None),
                      key=lambda sid: (len(lines[sid]), sid))
    assert [s.id for s in chain_order(snaps)] == expected


def test_folds_over_a_chain_that_loops_end():
    """A damaged chain: lineage stops where it meets itself again, and so do the folds."""
    from chunkvault.store.chain import chain_lengths, meets

    parents = {"a": "b", "b": "c", "c": "a", "d": "a", "e": "d"}
    assert chain_lengths(parents) == {sid: len(lineage(sid, parents)) for sid in parents} == \
        {"a": 3, "b": 3, "c": 3, "d": 4, "e": 5}
    assert meets(parents, {"c"}) == dict.fromkeys(parents, True)
    assert meets(parents, {"d"}) == {"a": False, "b": False, "c": False, "d": True, "e": True}


@given(forests(), st.data())
def test_folds_over_chains_that_loop_answer_as_each_lineage_does(parents, data):
    """Damaged or forged objects can make a chain loop: every fold still holds each lineage's snapshots."""
    from chunkvault.store.chain import broken_chains, chain_lengths, fold_chains, resolving_chains

    if parents:
        looped = data.draw(st.sampled_from(sorted(parents)))
        parents[looped] = data.draw(st.sampled_from(sorted(parents)))
    lines = {sid: lineage(sid, parents) for sid in parents}
    assert fold_chains(parents, lambda sid: frozenset([sid]), lambda sid, seen: seen | {sid}) == \
        {sid: frozenset(line) for sid, line in lines.items()}
    assert chain_lengths(parents) == {sid: len(line) for sid, line in lines.items()}
    assert resolving_chains(parents) == {sid: parents[line[-1]] is None for sid, line in lines.items()}
    assert broken_chains(parents) == {
        sid: parents[line[-1]] for sid, line in lines.items()
        if parents[line[-1]] is not None and parents[line[-1]] not in parents}


def test_a_forged_loop_of_many_snapshots_folds_once():
    """Folded per snapshot of the loop, 200,000 forged snapshots took minutes; once, well under a second."""
    from chunkvault.store.chain import chain_lengths

    n = 200_000
    parents = {f"s{i}": f"s{(i + 1) % n}" for i in range(n)}
    assert set(chain_lengths(parents).values()) == {n}
