"""The base a new delta takes: chains stay within their bound and restart at a depth drawn per chain."""
import random

from hypothesis import given, settings, strategies as st

from chunkvault.store.blob import FIXED_DELTA_DEPTH
from chunkvault.store.deltabase import choose_base, restart_span


def chain_ends(bound, versions, seed):
    """One chunk position replaced in every version, ids random: the depth of each version's blob."""
    rnd = random.Random(seed)
    base_of = {}
    cur = rnd.randbytes(32)
    depths = [0]
    for _ in range(versions - 1):
        chain = [cur]
        while chain[-1] in base_of:
            chain.append(base_of[chain[-1]])
        new = rnd.randbytes(32)
        base_of[new] = chain[choose_base(chain, bound)]
        depths.append(depths[-1] + 1 if base_of[new] == cur else 1)
        cur = new
    return depths


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 16), st.integers(0, 2**32))
def test_chains_restart_within_the_bound_past_half_of_it(bound, seed):
    depths = chain_ends(bound, 6 * bound, seed)
    assert max(depths) <= bound
    peaks = [d for d, after in zip(depths, depths[1:]) if after == 1 and d > 0]  # the depth each chain reached
    assert peaks and all(bound - restart_span(bound) < p <= bound for p in peaks)


def test_successive_chains_of_a_chunk_restart_at_independent_depths():
    """Keyed by the whole blob, which a restart keeps, every chain of a chunk had one length, and the chunks
    that restarted together kept doing so; keyed by each chain's first delta, the next length is drawn anew."""
    same = pairs = 0
    for seed in range(300):
        depths = chain_ends(FIXED_DELTA_DEPTH, 60, seed)
        peaks = [d for d, after in zip(depths, depths[1:]) if after == 1 and d > 0]
        pairs += len(peaks) - 1
        same += sum(a == b for a, b in zip(peaks, peaks[1:]))
    assert pairs > 1000 and abs(same / pairs - 1 / restart_span(FIXED_DELTA_DEPTH)) < 0.05
