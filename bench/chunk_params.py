"""Measure chunk-size parameters: dedup of successive versions vs. chunk count.

Two real data sets, each in several versions:

* sqlite  -- a SQLite database (~200 MiB by default) built with Python's
  sqlite3; between versions a batch of random row updates, inserts and
  deletes, then a checkpoint.  The file of every version is chunked.
* tree    -- regular files under system directories (/usr/lib, /usr/share by
  default, capped in size); the next version modifies a few percent of the
  files in place (random overwrites, inserts, deletes, appends).

For each average size (min = avg/4, max = avg*8 by default, as chunkvault's
defaults) it prints the chunk count of the first version, the mean chunk
size, and for each later version the bytes that are new (not a chunk of any
earlier version) and the dedup ratio (version bytes / new bytes).

    python bench/chunk_params.py [--sqlite-mb 200] [--tree-mb 1024] [--versions 3]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import tempfile
import time
from typing import Iterable, Iterator

import blake3

from chunkvault.chunker import Chunker, ChunkerParams

KIB = 1024
MIB = 1024 * KIB


def param_sets(avgs: Iterable[int], min_div: int, max_mul: int) -> list[ChunkerParams]:
    return [ChunkerParams(min_size=a // min_div, avg_size=a, max_size=a * max_mul) for a in avgs]


# ---- data set: SQLite ---------------------------------------------------------

def sqlite_versions(workdir: str, target_mb: int, versions: int, seed: int,
                    updates: int, inserts: int, deletes: int) -> Iterator[list[str]]:
    """Yield, per version, the list of file paths (a copy of the database file)."""
    rnd = random.Random(seed)
    db = os.path.join(workdir, "app.db")
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER, status TEXT, "
                "amount REAL, note TEXT)")
    con.execute("CREATE INDEX orders_customer ON orders(customer)")
    row_bytes = 170
    n_rows = target_mb * MIB // row_bytes

    def row() -> tuple:
        return (rnd.randrange(100_000), rnd.choice(["new", "paid", "shipped", "returned"]),
                round(rnd.uniform(1, 5000), 2), rnd.randbytes(rnd.randrange(60, 140)).hex()[:rnd.randrange(60, 140)])

    batch = 50_000
    for start in range(0, n_rows, batch):
        con.executemany("INSERT INTO orders (customer, status, amount, note) VALUES (?,?,?,?)",
                        [row() for _ in range(min(batch, n_rows - start))])
    con.commit()
    for v in range(versions):
        if v:
            max_id = con.execute("SELECT max(id) FROM orders").fetchone()[0]
            for _ in range(updates):
                con.execute("UPDATE orders SET status=?, amount=? WHERE id=?",
                            (rnd.choice(["paid", "shipped", "returned"]), round(rnd.uniform(1, 5000), 2),
                             rnd.randrange(1, max_id + 1)))
            con.executemany("INSERT INTO orders (customer, status, amount, note) VALUES (?,?,?,?)",
                            [row() for _ in range(inserts)])
            for _ in range(deletes):
                con.execute("DELETE FROM orders WHERE id=?", (rnd.randrange(1, max_id + 1),))
            con.commit()
        snap = os.path.join(workdir, f"app.v{v}.db")
        shutil.copyfile(db, snap)
        yield [snap]
    con.close()


# ---- data set: tree of system files ------------------------------------------

def list_tree(roots: list[str], cap_bytes: int) -> list[str]:
    files: list[str] = []
    total = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    if os.path.islink(path) or not os.path.isfile(path):
                        continue
                    size = os.path.getsize(path)
                    with open(path, "rb"):
                        pass
                except OSError:
                    continue
                if total + size > cap_bytes:
                    return files
                files.append(path)
                total += size
    return files


def modify(data: bytes, rnd: random.Random) -> bytes:
    """One realistic in-place edit: overwrite a few spots, insert, delete or append."""
    kind = rnd.choice(["overwrite", "insert", "delete", "append"])
    b = bytearray(data)
    if kind == "overwrite" or not b:
        for _ in range(rnd.randrange(1, 5)):
            at = rnd.randrange(len(b) + 1)
            b[at:at + 16] = rnd.randbytes(16)
    elif kind == "insert":
        at = rnd.randrange(len(b) + 1)
        b[at:at] = rnd.randbytes(rnd.randrange(1, 4096))
    elif kind == "delete":
        at = rnd.randrange(len(b))
        del b[at:at + rnd.randrange(1, 4096)]
    else:
        b += rnd.randbytes(rnd.randrange(1, 64 * KIB))
    return bytes(b)


class Tree:
    """Versions of a file tree held as edits over the original files on disk."""

    def __init__(self, files: list[str], change_share: float, seed: int):
        self.files = files
        self.change_share = change_share
        self.rnd = random.Random(seed)
        self.edited: dict[str, bytes] = {}

    def next_version(self) -> None:
        for path in self.rnd.sample(self.files, max(1, int(len(self.files) * self.change_share))):
            self.edited[path] = modify(self.read(path), self.rnd)

    def read(self, path: str) -> bytes:
        if path in self.edited:
            return self.edited[path]
        with open(path, "rb") as f:
            return f.read()


# ---- measurement -------------------------------------------------------------

class Tally:
    """Per parameter set: chunk digests seen so far and counters."""

    def __init__(self, params: ChunkerParams, secret: bytes):
        self.params = params
        self.chunker = Chunker(secret, params)
        self.seen: set[bytes] = set()
        self.rows: list[tuple[int, int, int, int]] = []  # (version bytes, new bytes, chunks, new chunks)

    def add_version(self, blobs: Iterable[bytes]) -> None:
        total = new = chunks = new_chunks = 0
        for data in blobs:
            start = 0
            view = memoryview(data)
            for end in self.chunker.cut_points(data):
                digest = blake3.blake3(view[start:end]).digest(16)
                chunks += 1
                if digest not in self.seen:
                    self.seen.add(digest)
                    new += end - start
                    new_chunks += 1
                start = end
            total += len(data)
        self.rows.append((total, new, chunks, new_chunks))


def report(name: str, tallies: list[Tally]) -> None:
    print(f"\n== {name}")
    print(f"{'avg':>8} {'min':>8} {'max':>8} {'chunks v0':>10} {'mean KiB':>9}  "
          + "  ".join(f"{'new MiB v%d' % i:>11} {'ratio':>6}" for i in range(1, len(tallies[0].rows)))
          + f"  {'stored/logical':>14}")
    for t in tallies:
        p = t.params
        total0, _, chunks0, _ = t.rows[0]
        cells = []
        for total, new, _, _ in t.rows[1:]:
            cells.append(f"{new / MIB:11.2f} {total / max(new, 1):6.1f}")
        logical = sum(r[0] for r in t.rows)
        stored = sum(r[1] for r in t.rows)
        print(f"{p.avg_size // KIB:7d}K {p.min_size // KIB:7d}K {p.max_size // KIB:7d}K {chunks0:10d} "
              f"{total0 / max(chunks0, 1) / KIB:9.1f}  " + "  ".join(cells) + f"  {stored / logical:14.3f}")


def run_sqlite(args: argparse.Namespace, params: list[ChunkerParams], secret: bytes) -> None:
    tallies = [Tally(p, secret) for p in params]
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        t0 = time.perf_counter()
        for v, paths in enumerate(sqlite_versions(work, args.sqlite_mb, args.versions, args.seed,
                                                  args.updates, args.inserts, args.deletes)):
            blobs = []
            for path in paths:
                with open(path, "rb") as f:
                    blobs.append(f.read())
            for t in tallies:
                t.add_version(blobs)
            for path in paths:
                os.unlink(path)
            print(f"sqlite v{v}: {sum(map(len, blobs)) / MIB:.1f} MiB ({time.perf_counter() - t0:.0f} s)", flush=True)
    report(f"sqlite: {args.updates} random updates, {args.inserts} inserts, {args.deletes} deletes per version",
           tallies)


def run_tree(args: argparse.Namespace, params: list[ChunkerParams], secret: bytes) -> None:
    files = list_tree(args.tree, args.tree_mb * MIB)
    tree = Tree(files, args.change, args.seed)
    tallies = [Tally(p, secret) for p in params]
    total = sum(os.path.getsize(f) for f in files)
    print(f"tree: {len(files)} files, {total / MIB:.0f} MiB", flush=True)
    for v in range(args.versions):
        if v:
            tree.next_version()
        for t in tallies:
            t.add_version(tree.read(path) for path in files)
        print(f"tree v{v} done", flush=True)
    report(f"tree of {len(files)} files, {args.change:.0%} of files edited per version", tallies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--avg-kib", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--min-div", type=int, default=4)
    ap.add_argument("--max-mul", type=int, default=8)
    ap.add_argument("--versions", type=int, default=3)
    ap.add_argument("--sqlite-mb", type=int, default=200)
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--inserts", type=int, default=5000)
    ap.add_argument("--deletes", type=int, default=100)
    ap.add_argument("--tree", nargs="+", default=["/usr/lib", "/usr/share"])
    ap.add_argument("--tree-mb", type=int, default=1024)
    ap.add_argument("--change", type=float, default=0.03, help="share of files edited per version")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default=None, help="directory for temporary database files")
    ap.add_argument("--only", choices=["sqlite", "tree"], default=None)
    args = ap.parse_args()
    params = param_sets([a * KIB for a in args.avg_kib], args.min_div, args.max_mul)
    secret = os.urandom(32)
    if args.only in (None, "sqlite"):
        run_sqlite(args, params, secret)
    if args.only in (None, "tree"):
        run_tree(args, params, secret)


if __name__ == "__main__":
    main()
