"""Reliability figures: kills survived, faults survived, corruptions detected, bad inputs tried.

    python bench/reliability.py            # the CI-sized run (20 runs per series, nearly all killed)
    python bench/reliability.py --long     # 200 runs per series, more faults and corruptions
    python bench/reliability.py --runs 500 --seed 7 --verbose

Uses the same harness as the test suites (tests/crashkit.py; tests/crashdrills.py, the kills of
forget, aggregate, rewrite, tag, the repairs, the key commands, the imports and the WAL archive;
tests/faults.py) and exits non-zero if anything was lost: a wrong restore, an unclean check, a
snapshot that was reported written and does not restore.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import crashdrills  # noqa: E402
import crashkit  # noqa: E402
from faults import FaultyRemote  # noqa: E402

from chunkvault import Repository  # noqa: E402
from chunkvault.errors import ChunkvaultError  # noqa: E402
from chunkvault.remotes.layer import RetryingRemote  # noqa: E402
from chunkvault.remotes.local import LocalRemote  # noqa: E402
from treeutil import describe  # noqa: E402


def fault_series(workdir: str, rounds: int, seed: int) -> dict[str, int]:
    """Backups, restores and checks through a remote failing 10% of calls (plus truncated reads)."""
    faulty = FaultyRemote(LocalRemote(os.path.join(workdir, "repo")), seed=seed, error_rate=0.10, truncate_rate=0.05)
    remote = RetryingRemote(faulty, attempts=12, sleep=lambda _s: None, rng=random.Random(seed))
    tree = crashkit.SourceTree(os.path.join(workdir, "src"), random.Random(seed), target_bytes=2 << 20)
    restores = 0
    with Repository.init(remote, crashkit.PASSWORD, kdf_seconds=0, pack_size=64 << 10,
                         chunker={"min_size": 16 << 10, "avg_size": 64 << 10, "max_size": 512 << 10}) as repo:
        for i in range(rounds):
            sid = repo.backup([tree.root]).snapshot.id
            state = tree.state()
            out = os.path.join(workdir, f"out{i}")
            repo.restore(sid, out)
            if describe(out) != state:
                raise AssertionError(f"fault round {i}: restore differs")
            restores += 1
            tree.mutate()
        report = repo.check(read_data=True)
        if not report.ok:
            raise AssertionError(f"check through faults: {report.to_dict()}")
    return {"calls": sum(faulty.calls.values()), "faults": sum(faulty.faults.values()), "retries": remote.retries,
            "restores": restores}


def decoder_fuzz(count: int, seed: int) -> tuple[int, int]:
    """Random and mutated bytes into every decoder: (inputs tried, foreign exceptions)."""
    from chunkvault.store.blob import open_blob
    from chunkvault.store.config import KeyFile, peek_config
    from chunkvault.store.crypto import Sealer
    from chunkvault.store.indexfile import decode_index
    from chunkvault.store.manifest import iter_records
    from chunkvault.store.pack import read_pack
    from chunkvault.store.snapshot import Snapshot

    rng = random.Random(seed)
    sealer = Sealer(bytes(32))
    decoders = [lambda b: open_blob(sealer, bytes(32), b), lambda b: read_pack(sealer, b, "p"),
                lambda b: decode_index(sealer, b, "i"), lambda b: Snapshot.decode(sealer, "s", b),
                peek_config, lambda b: KeyFile.decode("k", b), lambda b: list(iter_records([b[:9], b[9:]], "m"))]
    foreign = 0
    for _ in range(count):
        data = rng.randbytes(rng.randrange(0, 300))
        for decode in decoders:
            try:
                decode(data)
            except ChunkvaultError:
                pass
            except Exception:
                foreign += 1
    return count * len(decoders), foreign


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--long", action="store_true", help="200 runs per series, more faults and corruptions")
    p.add_argument("--runs", type=int, help="runs per series, each with a kill moment (default 20, or 200 with --long)")
    p.add_argument("--seed", type=int, default=20261128)
    p.add_argument("--skip", action="append", default=[],
                   choices=["backup", "prune", "copy", "drills", "faults", "tamper", "fuzz"])
    p.add_argument("--drill", action="append", default=[], metavar="NAME",
                   help="only these command drills (tests/crashdrills.py: forget-full, key-passwd, ...)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    runs = args.runs or (200 if args.long else 20)
    log = print if args.verbose else None
    started = time.monotonic()
    lines = []
    with tempfile.TemporaryDirectory(prefix="cv-reliability-") as work:
        os.environ["XDG_STATE_HOME"] = os.path.join(work, "state")  # the runs' client ledgers stay in here
        for name, series in (("backup", crashkit.crash_backup_series), ("prune", crashkit.crash_prune_series),
                             ("copy", crashkit.crash_copy_series)):
            if name in args.skip:
                continue
            d = os.path.join(work, name)
            os.makedirs(d)
            # long runs verify every snapshot every 10th kill (and a sample each time), or it grows quadratic
            fig = series(d, runs, args.seed, full_verify_every=10 if runs > 50 else 1, log=log)
            lines.append(fig.summary())
            print(lines[-1], flush=True)
        if "drills" not in args.skip:
            # the other commands that change a repository: a quarter of the runs each (at least 3), on copies of one
            # prepared repository; the same checks after every kill (tests/crashdrills.py)
            d = os.path.join(work, "drills")
            base = crashdrills.build_base(os.path.join(d, "base"), args.seed, wal=True)
            crashdrills.add_inputs(base, args.seed + 1)
            for name, drill in crashdrills.drills().items():
                if args.drill and name not in args.drill:
                    continue
                fig = crashdrills.drill_series(drill, base, os.path.join(d, name), max(3, runs // 4), args.seed,
                                               log=log)
                lines.append(fig.summary())
                print(lines[-1], flush=True)
        if "faults" not in args.skip:
            d = os.path.join(work, "faults")
            os.makedirs(d)
            f = fault_series(d, 30 if args.long else 6, args.seed)
            lines.append(f"faults: {f['faults']} injected in {f['calls']} remote calls, all survived "
                         f"({f['retries']} retries), {f['restores']} restores exact, check clean")
            print(lines[-1], flush=True)
        if "tamper" not in args.skip:
            d = os.path.join(work, "tamper")
            os.makedirs(d)
            tf, _ = crashkit.tamper_sweep(d, args.seed, flips=40 if args.long else 8, log=log)
            lines.append(tf.summary())
            print(lines[-1], flush=True)
            if tf.wrong_data:
                return 1
        if "fuzz" not in args.skip:
            tried, foreign = decoder_fuzz(20000 if args.long else 2000, args.seed)
            lines.append(f"bad inputs: {tried} random byte strings into the decoders, {foreign} foreign exceptions")
            print(lines[-1], flush=True)
            if foreign:
                return 1
    print(f"\nnothing lost; {time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
