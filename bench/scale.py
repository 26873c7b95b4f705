"""Blob index at scale: memory per chunk and lookup rates at 1M / 10M / 50M chunks.

    python bench/scale.py                 # 1M and 10M
    python bench/scale.py --full          # 1M, 10M and 50M
    python bench/scale.py --sizes 2M,20M

Each size runs in a fresh child process so its RSS figures are its own.  Ids are
random 32-byte strings (blob ids are keyed hashes, so random is what they look
like).  Reported per size:

* bulk build: ``add_many`` of all ids into an empty index (no capacity hint, so
  the index grows as it would while loading many index files); its
  ``memory_bytes()`` per chunk, the RSS growth per chunk, the peak RSS growth
  during the build, and the process RSS once the input ids are freed (what a
  process holding just this index uses);
* single ``in`` lookups per second, of present and of absent ids, and ``get``;
* vectorised ``contains_many`` lookups per second (1M present + 1M absent);
* single ``add`` of new ids into the full index, per second;
* an index grown one ``add`` at a time (a sample, default 1M): adds per second
  and memory per chunk.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from array import array
from random import Random

from chunkvault.store.blobindex import BlobIndex

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def random_bytes(rng: Random, size: int) -> bytearray:
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(min(size - len(out), 32 << 20))
    return out


def pick_ids(ids: bytes, rng: Random, count: int) -> bytes:
    """``count`` ids drawn from the packed ``ids``, packed."""
    n = len(ids) // 32
    return b"".join(ids[32 * i : 32 * i + 32] for i in (rng.randrange(n) for _ in range(count)))


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def measure(n: int, sample: int, incremental: int, seed: int) -> dict:
    rng = Random(seed)
    out: dict = {"n": n}
    ids = random_bytes(rng, 32 * n)
    packs = array("I")
    for p in range(-(-n // 4096)):
        packs.extend(array("I", (p,)) * 4096)
    del packs[n:]
    offsets = array("I", range(n))
    gc.collect()

    base = rss()
    index = BlobIndex()
    t = time.perf_counter()
    added = index.add_many(ids, packs, offsets, 4096, 8192)
    out["bulk_s"] = time.perf_counter() - t
    assert added == n
    out["bulk_per_s"] = rate(n, out["bulk_s"])
    out["mem_bytes_per_chunk"] = index.memory_bytes() / n
    out["rss_growth_per_chunk"] = (rss() - base) / n
    out["peak_growth_per_chunk"] = (peak_rss() - base) / n

    present = [bytes(ids[32 * i : 32 * i + 32]) for i in (rng.randrange(n) for _ in range(sample))]
    vec_present = pick_ids(ids, rng, min(n, 1_000_000))
    del ids, packs, offsets
    gc.collect()
    out["process_rss_gb"] = rss() / 2**30
    absent = [rng.randbytes(32) for _ in range(sample)]
    vec_absent = random_bytes(rng, len(vec_present))

    for name, probe in (("present", present), ("absent", absent)):
        t = time.perf_counter()
        hits = sum(1 for b in probe if b in index)
        out[f"in_{name}_per_s"] = rate(len(probe), time.perf_counter() - t)
        assert hits == (len(probe) if name == "present" else 0)
    t = time.perf_counter()
    for b in present:
        index.get(b)
    out["get_per_s"] = rate(len(present), time.perf_counter() - t)

    t = time.perf_counter()
    found = index.contains_many(vec_present).count(1) + index.contains_many(vec_absent).count(1)
    out["vector_per_s"] = rate(2 * len(vec_present) // 32, time.perf_counter() - t)
    assert found == len(vec_present) // 32

    new = [rng.randbytes(32) for _ in range(sample)]
    t = time.perf_counter()
    for i, b in enumerate(new):
        index.add(b, 1, i, 4096, 8192)
    out["add_into_full_per_s"] = rate(len(new), time.perf_counter() - t)
    out["mem_bytes_per_chunk_after_adds"] = index.memory_bytes() / len(index)
    del index, present, absent, vec_present, vec_absent
    gc.collect()

    m = min(n, incremental)
    grow = BlobIndex()
    grow_ids = [rng.randbytes(32) for _ in range(m)]
    t = time.perf_counter()
    for i, b in enumerate(grow_ids):
        grow.add(b, i >> 12, i, 4096, 8192)
    out["incremental_n"] = m
    out["incremental_per_s"] = rate(m, time.perf_counter() - t)
    out["incremental_bytes_per_chunk"] = grow.memory_bytes() / m
    return out


def report(r: dict) -> None:
    n = r["n"]
    print(f"--- {n:,} chunks")
    print(f"bulk add_many            {r['bulk_s']:8.2f} s   ({r['bulk_per_s'] / 1e6:.2f} M ids/s)")
    print(f"memory_bytes() / chunk   {r['mem_bytes_per_chunk']:8.1f} B")
    print(f"RSS growth / chunk       {r['rss_growth_per_chunk']:8.1f} B   (peak during build: "
          f"{r['peak_growth_per_chunk']:.1f} B)")
    print(f"process RSS, index only  {r['process_rss_gb']:8.2f} GiB")
    print(f"single `in`, present     {r['in_present_per_s'] / 1e3:8.0f} k/s  "
          f"({1e6 / r['in_present_per_s']:.2f} us each)")
    print(f"single `in`, absent      {r['in_absent_per_s'] / 1e3:8.0f} k/s  "
          f"({1e6 / r['in_absent_per_s']:.2f} us each)")
    print(f"single get()             {r['get_per_s'] / 1e3:8.0f} k/s")
    print(f"contains_many            {r['vector_per_s'] / 1e6:8.2f} M/s")
    print(f"single add() into index  {r['add_into_full_per_s'] / 1e3:8.0f} k/s   "
          f"(then {r['mem_bytes_per_chunk_after_adds']:.1f} B/chunk)")
    print(f"grown by add() ({r['incremental_n']:,})  {r['incremental_per_s'] / 1e3:6.0f} k/s   "
          f"{r['incremental_bytes_per_chunk']:.1f} B/chunk")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,10M", help="comma-separated chunk counts (default 1M,10M)")
    ap.add_argument("--full", action="store_true", help="also run 50M chunks")
    ap.add_argument("--sample", type=int, default=200_000, help="single lookups/adds per measurement")
    ap.add_argument("--incremental", type=int, default=1_000_000, help="size of the index grown by add()")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.sample, args.incremental, args.seed)))
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if args.full and 50_000_000 not in sizes:
        sizes.append(50_000_000)
    print(f"blob index scale benchmark: {os.cpu_count()} cpus, "
          f"{os.sysconf('SC_PHYS_PAGES') * PAGE / 2**30:.1f} GiB RAM")
    for n in sizes:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--sample", str(args.sample),
               "--incremental", str(args.incremental), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        report(json.loads(proc.stdout.strip().splitlines()[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
