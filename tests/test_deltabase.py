"""The base a new delta takes: chains stay within their bound, and chunks restart in turns, so every version
of a busy file restarts about the same share of its chunks."""
import random

import blake3
from hypothesis import given, settings, strategies as st

from chunkvault.store.blob import FIXED_DELTA_DEPTH
from chunkvault.store.deltabase import choose_base, restart_period, restart_phase, restart_turns


KEY = bytes(range(32))


def keyed(data: bytes) -> bytes:
    return blake3.blake3(data, key=KEY).digest()


def turns_of(seq: int, path: bytes, bound: int) -> range:
    return restart_turns(seq, restart_phase(keyed, path), bound)


def depths_over_versions(bound, versions, files, chunks, changed=1.0, seed=0):
    """Depth of each chunk's blob in each version of a series, when each chunk changes with probability
    ``changed`` per version and every delta's base is chosen by ``choose_base``."""
    rnd = random.Random(seed)
    base_of = {}
    current = {(f, i): rnd.randbytes(32) for f in range(files) for i in range(chunks)}
    table = []
    for seq in range(1, versions):
        row = {}
        for f in range(files):
            path = b"base/%d" % f
            turns = turns_of(seq, path, bound)
            for i in range(chunks):
                cur = current[f, i]
                chain = [cur]
                while chain[-1] in base_of:
                    chain.append(base_of[chain[-1]])
                if rnd.random() < changed:
                    new = rnd.randbytes(32)
                    base_of[new] = chain[choose_base(chain, bound, i in turns)]
                    current[f, i] = new
                    chain = [new]
                    while chain[-1] in base_of:
                        chain.append(base_of[chain[-1]])
                row[f, i] = len(chain) - 1
        table.append(row)
    return table


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.floats(0.2, 1.0), st.integers(0, 2**32))
def test_chains_stay_within_the_bound(bound, changed, seed):
    table = depths_over_versions(bound, 4 * bound, 2, 7, changed, seed)
    assert max(d for row in table for d in row.values()) <= bound


def test_every_version_restarts_about_the_same_share_of_chunks():
    """Chains whose length was drawn at random restarted by chance: some versions held far more restarts than
    others.  In turns, each version restarts about one chunk in ``restart_period``."""
    bound, chunks = FIXED_DELTA_DEPTH, 300
    table = depths_over_versions(bound, 4 * bound, 3, chunks)
    restarts = [sum(d == 1 for d in row.values()) for row in table[bound:]]
    expect = 3 * chunks / restart_period(bound)
    assert all(0.85 * expect <= r <= 1.15 * expect for r in restarts)
    mean_depth = sum(d for row in table[bound:] for d in row.values()) / (len(table) - bound) / (3 * chunks)
    assert abs(mean_depth - (restart_period(bound) + 1) / 2) < 0.3


def test_turns_move_with_the_sequence_and_differ_between_files():
    period = restart_period(FIXED_DELTA_DEPTH)
    a = [turns_of(seq, b"base/1", FIXED_DELTA_DEPTH)[0] for seq in range(period)]
    assert sorted(a) == list(range(period))  # each chunk's turn comes once a period
    firsts = {turns_of(5, b"base/%d" % f, FIXED_DELTA_DEPTH)[0] for f in range(40)}
    assert len(firsts) > period // 2  # small files do not all restart in one version
    assert choose_base([b"a"], FIXED_DELTA_DEPTH, True) == 0  # a whole blob is the base itself


def test_a_path_s_phase_is_keyed():
    """Which chunks restart in a version depends on the repository's key, not on the path alone."""
    other = lambda data: blake3.blake3(data, key=bytes(32)).digest()  # noqa: E731
    paths = [b"base/%d" % f for f in range(40)]
    assert [restart_phase(keyed, p) for p in paths] != [restart_phase(other, p) for p in paths]
    assert restart_phase(keyed, b"base/1") == restart_phase(keyed, b"base/1")
