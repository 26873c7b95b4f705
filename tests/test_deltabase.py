"""The base a new delta takes: chains stay within their bound, restart at depths drawn per chain, and restart
against the previous restart (one chain of changes) rather than the ageing whole blob."""
import random
import statistics

from hypothesis import given, settings, strategies as st

from chunkvault.store.blob import FIXED_DELTA_DEPTH
from chunkvault.store.deltabase import choose_base, restart_span

BLOCK_DELTA = 5 << 10  # one version's changes to a 1 MiB database chunk


WHOLE = 60 << 10  # the chunk compressed on its own


def series(bound, versions, seed, size_of=None):
    """One chunk position replaced in every version: for each version, (parent's depth, base's index in the
    parent's chain, age of the base in versions, the new blob's depth).  Ids are random; a delta's stored size
    grows with its base's age, as measured on PostgreSQL pages, unless ``size_of(rnd, age)`` says otherwise; a
    delta no smaller than the chunk compressed on its own is stored whole instead, as backups do."""
    rnd = random.Random(seed)
    size_of = size_of or (lambda r, age: int(BLOCK_DELTA * age ** 0.8 * r.uniform(0.8, 1.2)))
    made = {}  # id -> (version, base id or None, stored size)
    cur = rnd.randbytes(32)
    made[cur] = (0, None, WHOLE)
    depth = {cur: 0}
    out = []
    for v in range(1, versions):
        chain = [cur]
        while made[chain[-1]][1] is not None:
            chain.append(made[chain[-1]][1])
        i = choose_base(chain, lambda b: made[b][2], bound)
        base = chain[i]
        age = v - made[base][0]
        new = rnd.randbytes(32)
        size = size_of(rnd, age)
        made[new] = (v, base, size) if size < WHOLE else (v, None, WHOLE)
        depth[new] = depth[base] + 1 if size < WHOLE else 0
        out.append((len(chain) - 1, i, age, depth[new]))
        cur = new
    return out


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 16), st.integers(0, 2**32), st.sampled_from(["aged", "random", "equal"]))
def test_chains_stay_within_the_bound_and_restart_past_half_of_it(bound, seed, sizes):
    size_of = {"aged": None, "random": lambda r, age: r.randrange(1, 1 << 20), "equal": lambda r, age: 100}[sizes]
    span = restart_span(bound)
    steps = series(bound, 8 * bound, seed, size_of)
    assert max(new for *_, new in steps) <= bound
    for parent, i, _, new in steps:
        if i > 0:  # a restart: the parent's chain had reached its limit
            assert parent > bound - span
            assert new <= max(span, 1)  # in the lower half of the bound, or right above the whole blob


def test_restarts_climb_from_restart_to_restart_and_stay_young():
    """On database pages a restart takes the previous restart as base, so it holds about one chain's changes;
    above half the bound the ladder starts again from the whole blob."""
    ladder = whole = 0
    ages = []
    for seed in range(40):
        for parent, i, age, new in series(FIXED_DELTA_DEPTH, 120, seed):
            if i == 0:
                continue
            ages.append(age)
            if i == parent:  # against the whole blob
                whole += 1
            else:
                ladder += 1
    assert ladder > 3 * whole
    assert statistics.median(ages) <= FIXED_DELTA_DEPTH
    assert max(ages) < 8 * FIXED_DELTA_DEPTH


def test_successive_chains_of_a_chunk_restart_at_independent_depths():
    """Keyed by the whole blob, which a restart kept, every chain of a chunk had one length, and the chunks
    that restarted together kept doing so; keyed by the blob each chain started from, it is drawn anew."""
    same = pairs = 0
    for seed in range(300):
        steps = series(FIXED_DELTA_DEPTH, 60, seed)
        ends = [parent for parent, i, _, _ in steps if i > 0]
        pairs += len(ends) - 1
        same += sum(a == b for a, b in zip(ends, ends[1:]))
    assert pairs > 1000 and abs(same / pairs - 1 / restart_span(FIXED_DELTA_DEPTH)) < 0.06


def test_a_chain_without_a_marked_restart_starts_from_its_first_delta():
    chain = [bytes([k]) * 32 for k in range(12, -1, -1)]  # depths 12 .. 0; chain[i] has depth 12 - i
    sizes = {b: 100 for b in chain}
    assert choose_base(chain, sizes.__getitem__, 12) == 11  # the first delta, depth 1
    sizes[chain[7]] = 1000  # depth 5: a restart to climb on
    assert choose_base(chain, sizes.__getitem__, 12) == 7
    sizes[chain[6]] = 1000  # depth 6, half the bound: too high to climb on; the whole blob again
    assert choose_base(chain, sizes.__getitem__, 12) == 12
    sizes[chain[6]] = sizes[chain[7]] = 100
    sizes[chain[3]] = 1000  # a large delta above half the bound is no restart
    assert choose_base(chain, sizes.__getitem__, 12) == 11
    assert choose_base(chain[6:], sizes.__getitem__, 12) == 0  # depth 6: no chain ends this low
