"""Opening the index of a repository of mostly delta blobs: memory per blob and time.

    python bench/delta_index.py                   # 600K blobs, 15 of every 16 a delta
    python bench/delta_index.py --blobs 2M --chain 8
    python bench/delta_index.py --blobs 2M --check    # check's structural pass beside the open

A database backed up hourly stores most chunks as deltas on the version before
(README "Delta blobs"). The repository here is made of synthetic index objects
(no packs: only the index is read), one per ``--per-object`` blobs as a backup
writes them: each chunk's versions form a chain, every ``--chain``-th version
stored whole, the others each a delta on the one before. A second repository
of as many blobs, all stored whole, tells what a delta costs beyond a whole
blob. Each is opened in a fresh child process, so its RSS figures are its own:
the RSS the index adds (after the index objects' bytes are let go), the peak
while loading, the time ``load_index`` takes (and the CPU time of its
threads), and that of ``withhold_unreadable_deltas`` (every backup asks it
before deduplicating).

``--check``: the packs are written too, each its sealed header and trailer after a hole as long as its
blobs (sparse files: a check without --read-data reads only headers), and ``check`` (its structural pass:
no snapshots, every index object and pack header) runs in a child of its own beside the open of the index,
both from the open repository: its peak RSS a blob above the open's, and its time.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from random import Random

from chunkvault.remotes import open_remote
from chunkvault.store.blob import KIND_DELTA, KIND_ZSTD
from chunkvault.store.check import Checker
from chunkvault.store.indexfile import IndexData
from chunkvault.store.pack import PACK_MAGIC, TRAILER, PackEntry, seal_header
from chunkvault.store.repository import Repo

from scale import parse_size, peak_rss, rss

PASSWORD = b"bench"
ENTRIES_PER_PACK = 1024




def write_pack(repo: Repo, root: str, pack_id: bytes, entries: list[PackEntry]) -> None:
    """A pack of these entries: a hole where its blobs would lie, then its sealed header and trailer."""
    header = seal_header(repo.sealer, entries)
    h = pack_id.hex()
    os.makedirs(os.path.join(root, "data", h[:2]), exist_ok=True)
    with open(os.path.join(root, "data", h[:2], h), "wb") as f:
        f.truncate(max((e.offset + e.length for e in entries), default=0))
        f.seek(0, os.SEEK_END)
        f.write(header + TRAILER.pack(len(header), PACK_MAGIC))


def make(path: str, blobs: int, chain: int, per_object: int, seed: int, packs_too: bool = False) -> int:
    """A repository at ``path`` whose index lists ``blobs`` blobs (``chain`` > 1: chains of deltas); returns
    how many are deltas.  ``packs_too``: the packs are stored as well (``write_pack``)."""
    repo = Repo.init(open_remote(path), PASSWORD, kdf_seconds=0)
    rng = Random(seed)
    chunks = max(1, blobs // max(1, chain))  # chunks of the file, each with its chain of versions
    last = [b""] * chunks
    deltas = 0
    made = 0
    version = 0
    while made < blobs:
        packs: dict[bytes, list[PackEntry]] = {}
        entries: list[PackEntry] = []
        for _ in range(min(per_object, blobs - made)):
            c = made % chunks
            version = made // chunks
            blob_id = rng.randbytes(32)
            if chain > 1 and version % chain:
                entries.append(PackEntry(blob_id, KIND_DELTA, len(entries) * 300, 300, 1 << 18, last[c]))
                deltas += 1
            else:
                entries.append(PackEntry(blob_id, KIND_ZSTD, len(entries) * 300, 300, 1 << 18))
            last[c] = blob_id
            made += 1
            if len(entries) == ENTRIES_PER_PACK:
                packs[rng.randbytes(32)], entries = entries, []
        if entries:
            packs[rng.randbytes(32)] = entries
        repo.write_index(IndexData(packs))
        for pack_id, listed in packs.items() if packs_too else ():
            write_pack(repo, path, pack_id, listed)
    return deltas


def measure(path: str) -> dict:
    repo = Repo.open(open_remote(path), PASSWORD)
    repo.index_names()  # the listing's own allocations before the baseline
    gc.collect()
    base = rss()
    t, cpu = time.perf_counter(), time.process_time()
    repo.load_index()
    load_s, load_cpu = time.perf_counter() - t, time.process_time() - cpu
    gc.collect()
    after = rss()
    t = time.perf_counter()
    withheld = repo.withhold_unreadable_deltas()
    withhold_s = time.perf_counter() - t
    n = len(repo.index)
    return {"blobs": n, "load_s": load_s, "load_cpu": load_cpu, "withhold_s": withhold_s, "withheld": len(withheld),
            "rss_per_blob": (after - base) / n, "peak_per_blob": (peak_rss() - base) / n,
            "index_bytes_per_blob": repo.index.memory_bytes() / n}


def measure_check(path: str) -> dict:
    """``check`` without --read-data, from the repository opened: peak RSS above that, and its time."""
    repo = Repo.open(open_remote(path), PASSWORD)
    repo.index_names()
    gc.collect()
    base = rss()
    checker = Checker(repo)
    load = checker._load_index
    took: list[float] = []

    def timed_load():  # the index objects read and the deltas' bases checked: the part that grows with deltas
        t = time.perf_counter()
        try:
            return load()
        finally:
            took.append(time.perf_counter() - t)

    checker._load_index = timed_load  # type: ignore[method-assign]
    t, cpu = time.perf_counter(), time.process_time()
    report = checker.run()
    check_s, check_cpu = time.perf_counter() - t, time.process_time() - cpu
    gc.collect()
    n = report.blobs
    return {"blobs": n, "check_s": check_s, "check_cpu": check_cpu, "load_index_s": took[0],
            "problems": len(report.problems), "packs": report.packs,
            "rss_per_blob": (rss() - base) / n, "peak_per_blob": (peak_rss() - base) / n}


def run_child(path: str, mode: str = "--child") -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), mode, path], capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blobs", default="600K", help="blobs in the index (default 600K)")
    ap.add_argument("--chain", type=int, default=16, help="versions per chain: one whole, the rest deltas")
    ap.add_argument("--per-object", type=int, default=50_000, help="blobs per index object")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="store the packs too, and time check's structural pass")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--check-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child)))
        return 0
    if args.check_child:
        print(json.dumps(measure_check(args.check_child)))
        return 0
    blobs = parse_size(args.blobs)
    if args.check:
        return check_main(blobs, args)
    with tempfile.TemporaryDirectory() as work:
        results = {}
        for name, chain in (("deltas", args.chain), ("whole", 1)):
            path = os.path.join(work, name)
            deltas = make(path, blobs, chain, args.per_object, args.seed)
            results[name] = (deltas, run_child(path))
    (deltas, d), (_, w) = results["deltas"], results["whole"]
    for name, (k, r) in results.items():
        print(f"{name:7} {r['blobs']:,} blobs ({k:,} deltas): load_index {r['load_s']:.2f} s ({r['load_cpu']:.2f} s "
              f"CPU), withhold "
              f"{r['withhold_s'] * 1e3:.0f} ms ({r['withheld']} withheld); RSS added {r['rss_per_blob']:.1f} B a "
              f"blob (peak {r['peak_per_blob']:.1f}); memory_bytes {r['index_bytes_per_blob']:.1f} B a blob")
    if deltas:
        extra = (d["rss_per_blob"] - w["rss_per_blob"]) * d["blobs"] / deltas
        print(f"a delta beyond a whole blob: {extra:.1f} B of RSS; a delta in all: "
              f"{w['rss_per_blob'] + extra:.1f} B")
    return 0


def check_main(blobs: int, args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "deltas")
        deltas = make(path, blobs, args.chain, args.per_object, args.seed, packs_too=True)
        opened = run_child(path)
        checked = run_child(path, "--check-child")
    print(f"open   {opened['blobs']:,} blobs ({deltas:,} deltas): load_index {opened['load_s']:.2f} s "
          f"({opened['load_cpu']:.2f} s CPU); RSS added {opened['rss_per_blob']:.1f} B a blob "
          f"(peak {opened['peak_per_blob']:.1f})")
    print(f"check  {checked['blobs']:,} blobs, {checked['packs']:,} packs, {checked['problems']} problem(s): "
          f"{checked['check_s']:.2f} s ({checked['check_cpu']:.2f} s CPU; reading the index and checking the "
          f"deltas' bases {checked['load_index_s']:.2f} s); RSS added {checked['rss_per_blob']:.1f} B a blob "
          f"(peak {checked['peak_per_blob']:.1f})")
    print(f"check's peak beyond the open's: {checked['peak_per_blob'] - opened['peak_per_blob']:.1f} B a blob")
    return 0


if __name__ == "__main__":
    sys.exit(main())
