"""Database version series: chunkvault beside restic and borg on successive copies of a live database.

PostgreSQL: a cluster on a free 127.0.0.1 port is filled with
``pgbench -i -s SCALE``; then ``--versions`` times a ``pg_basebackup -Fp -Xs``
copy is taken into one fixed path, with ``--transactions`` pgbench
transactions per client (or ``--interval`` seconds) of ``pgbench -c CLIENTS``
between copies.  SQLite: a database of about ``--sqlite-mb`` MiB gets random
row updates between versions and is copied into one fixed path with its
online backup API.  Every copy is backed up by each tool in the same run; the
table gives, per tool and version, the seconds the backup took (wall clock,
and CPU seconds of the tool's processes: the machine may be shared; the dirty
pages of the copy and of the previous tool are written out first, untimed) and the
MiB it added to the repository, with the ratios to restic.  Targets for
chunkvault's differential versions: at most 0.15x restic's added bytes and
0.5x restic's time.  Then the last version is restored from each repository,
and, for chunkvault, also from a fresh repository holding that same tree as
one full snapshot without deltas, opened the same way (with the password, and
with a key secret where a ``+secret`` tool is compared to it): the restore of a
mostly-delta snapshot should take at most 1.5x that.  Each restore is timed
``--restore-trials`` times, alternating, and the fastest counts (the median
of each trial's ratio, delta repository to full, is printed beside it: a
trial restores every repository once, seconds apart, so the machine's speed
drifting between trials moves it less); with
``--restore-into /dev/shm`` they go into a tmpfs, so that the disk's
write-back of one restore does not slow the next.

Tools: ``chunkvault`` cuts every file by content; ``chunkvault-fixed`` cuts
every file of the copies at fixed 1 MiB offsets (``--fixed-chunks '*'``), and
``chunkvault-fixed-SIZE`` (e.g. ``chunkvault-fixed-256K``) at another size.
A ``+secret`` suffix (``chunkvault-fixed+secret``) opens that repository with
a generated key secret instead of the password: no password derivation at each command.

Runs repeat: the load is a fixed number of transactions, pgbench and the
SQLite updates draw from ``--seed``, and chunkvault's repositories share one
fixed chunker secret (``--chunker-secret``), so chunk boundaries do not move
from run to run.  The settings are printed first.

    python bench/dbseries.py [--scale 40] [--versions 4] [--transactions 25000 | --interval 15]
                             [--sqlite-mb 500] [--seed 20261128] [--chunker-secret HEX]
                             [--only pg|sqlite] [--tools chunkvault,chunkvault-fixed,restic,borg]
                             [--restore-trials 3] [--restore-into DIR] [--work DIR] [--keep]

restic and borg are installed with apt-get when missing; PostgreSQL comes from
Debian's ``postgresql`` package (or initdb on PATH).  As root, the server runs
as the ``postgres`` user (or ``nobody``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sqlite3
import subprocess
import sys
import time
from copy import copy as clone
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from compare import PASSWORD, SECRET_SUFFIX, Borg, Chunkvault, Restic, Tool, du, ensure_tools, run  # noqa: E402
from servers_pg import PgCluster, find_pg_bindir  # noqa: E402

MiB = 1 << 20
SEED = 20261128
CHUNKER_SECRET = bytes(range(0x40, 0x60)).hex()
FULL = "chunkvault full"  # the last version as one full snapshot without deltas, restored for comparison


class FixedChunkvault(Chunkvault):
    """A chunkvault repository created through the Python API with a given chunker secret
    (the CLI draws a random one), so chunk boundaries repeat from run to run."""

    secret = bytes.fromhex(CHUNKER_SECRET)

    def init(self):
        from chunkvault import Repository, new_secret

        start = time.perf_counter()
        password = PASSWORD.encode()
        if self.secret_file:
            password = new_secret()
            with open(self.secret_file, "wb") as f:
                f.write(password)
        Repository.init(self.repo, password, chunker_secret=self.secret).close()
        return time.perf_counter() - start, 0


class FixedCutChunkvault(FixedChunkvault):
    """chunkvault with ``--fixed-chunks '*'``: every file of the copy cut at fixed offsets.

    Named ``chunkvault-fixed``, or ``chunkvault-fixed-SIZE`` for another ``--fixed-chunk-size``.
    """

    def __init__(self, work: str, name: str = "chunkvault-fixed", secret: bool = False):
        self.name = name
        self.chunk_size = name[len("chunkvault-fixed-"):] if name.startswith("chunkvault-fixed-") else None
        super().__init__(work, secret)

    def backup(self, data):
        size = ["--fixed-chunk-size", self.chunk_size] if self.chunk_size else []
        return run(self.cmd + ["backup", "-q", "--fixed-chunks", "*", *size, data], self.env)


@dataclass
class Step:
    version: int
    seconds: float
    added: int  # bytes the repository grew by
    note: str = ""
    cpu: float = 0.0  # user + system seconds of the tool's processes


@dataclass
class Series:
    title: str
    sizes: list[int] = field(default_factory=list)  # bytes of each version's copy
    steps: dict[str, list[Step]] = field(default_factory=dict)
    restores: dict[str, list[float]] = field(default_factory=dict)  # restores of the last version, per repository,
    # one per trial; trials alternate between repositories


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def tree_bytes(path: str) -> int:
    return du(path) if os.path.isdir(path) else os.path.getsize(path)


def chunkvault_note(tool: Chunkvault) -> str:
    """How the newest snapshot stored its new data (read after the timed backup)."""
    out = subprocess.run(tool.cmd + ["snapshots", "--json"], env=tool.env, capture_output=True, check=True).stdout
    st = max(json.loads(out), key=lambda s: s["time"])["stats"]
    return (f"{st['delta_blobs']} delta blobs, {st['delta_stored_bytes'] / MiB:.1f} MiB as deltas, "
            f"{st['whole_stored_bytes'] / MiB:.1f} MiB whole")


def back_up(series: Series, tools: list[Tool], path: str, version: int) -> None:
    series.sizes.append(tree_bytes(path))
    for t in tools:
        before = t.size()
        cpu = children_cpu()
        seconds, _ = t.backup(path)
        cpu = children_cpu() - cpu
        note = chunkvault_note(t) if isinstance(t, Chunkvault) else ""
        series.steps.setdefault(t.name, []).append(Step(version, seconds, t.size() - before, note, cpu))
        print(f"  v{version} {t.name}: {seconds:.2f} s ({cpu:.2f} s CPU), +{(t.size() - before) / MiB:.1f} MiB {note}",
              flush=True)


def time_restores(series: Series, tools: list[Tool], path: str, work: str, trials: int,
                  restore_into: str | None = None) -> None:
    """Fastest of ``trials`` restores of the last version from each repository, and from a
    chunkvault repository holding that tree as one full snapshot without deltas, opened the same
    way as each chunkvault repository it is held against (with the password, or with a key secret
    as ``+secret`` tools are): the key derivation alone is half a second."""
    repos: dict[str, Tool] = {t.name: t for t in tools}
    if any(n.startswith("chunkvault") for n in repos):
        os.makedirs(os.path.join(work, "full"), exist_ok=True)
        full = FixedChunkvault(os.path.join(work, "full"))
        full.init()
        run(full.cmd + ["backup", "-q", "--no-delta", path], full.env)
        repos[FULL] = full
        if any(n.startswith("chunkvault") and n.endswith(SECRET_SUFFIX) for n in repos):
            secret = os.path.join(work, "full", "full.key")
            run(full.cmd + ["key", "add", "--generate-secret", secret], full.env)
            opened = clone(full)
            opened.name = FULL + SECRET_SUFFIX
            opened.env = {k: v for k, v in full.env.items() if k != "CHUNKVAULT_PASSWORD"}
            opened.env["CHUNKVAULT_PASSWORD_FILE"] = secret
            repos[opened.name] = opened
    target = os.path.join(restore_into or work, "restored")
    for _ in range(trials):
        for name, t in repos.items():
            shutil.rmtree(target, ignore_errors=True)
            seconds, _ = t.restore(target)
            series.restores.setdefault(name, []).append(seconds)
    shutil.rmtree(target, ignore_errors=True)
    print("  restore of the last version: " + ", ".join(f"{n} {min(s):.2f} s" for n, s in series.restores.items()),
          flush=True)


def fresh_tools(work: str, names: list[str], tag: str) -> list[Tool]:
    classes = {"chunkvault": FixedChunkvault, "restic": Restic, "borg": Borg}
    base = os.path.join(work, tag)
    os.makedirs(base, exist_ok=True)
    tools: list[Tool] = []
    for n in names:
        secret = n.endswith(SECRET_SUFFIX)
        n = n.removesuffix(SECRET_SUFFIX)
        if n.startswith("chunkvault-fixed"):
            tools.append(FixedCutChunkvault(base, n, secret))
        else:
            tools.append(classes[n](base, secret) if secret else classes[n](base))
    for t in tools:
        t.init()
    return tools


def pg_series(args: argparse.Namespace, work: str) -> Series:
    bindir = find_pg_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL not found: apt-get install postgresql")
    tools = fresh_tools(work, args.tools, "pg")
    with PgCluster(bindir, settings=()) as pg:
        pg.init()
        pg.start()
        start = time.perf_counter()
        pg.pgbench("-i", "-q", "-s", str(args.scale))
        print(f"pgbench -i -s {args.scale}: {time.perf_counter() - start:.0f} s", flush=True)
        copy = os.path.join(pg.backups, "current")
        load = f"{args.interval} s" if args.interval else f"{args.transactions} transactions per client"
        series = Series(f"PostgreSQL ({os.path.basename(os.path.dirname(bindir))}), pgbench -i -s {args.scale}, "
                        f"{load} of pgbench -c {args.clients} (seed {args.seed}) between pg_basebackup copies")
        for v in range(1, args.versions + 1):
            if v > 1:
                amount = ["-T", str(args.interval)] if args.interval else ["-t", str(args.transactions)]
                out = pg.pgbench("-c", str(args.clients), "-j", str(args.clients), *amount, "-n",
                                 f"--random-seed={args.seed + v}")
                tps = next((line for line in out.splitlines() if line.startswith("tps")), "").strip()
                print(f"pgbench {load}: {tps}", flush=True)
            shutil.rmtree(copy, ignore_errors=True)
            pg.basebackup(copy)
            back_up(series, tools, copy, v)
        time_restores(series, tools, copy, os.path.join(work, "pg"), args.restore_trials, args.restore_into)
    return series


_WORDS = [bytes(random.Random(w).choice(b"abcdefghij ") for _ in range(140)) for w in range(4096)]


def _payload(rnd: random.Random) -> bytes:
    """Semi-compressible, like an application's records: some random bytes, some text."""
    return rnd.randbytes(48) + _WORDS[rnd.randrange(len(_WORDS))][: rnd.randrange(60, 140)]


def _row(rnd: random.Random, i: int) -> tuple[int, int, str, bytes]:
    return (i, rnd.randrange(1 << 31), f"customer-{rnd.randrange(100000):06d}", _payload(rnd))


def _db_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def sqlite_series(args: argparse.Namespace, work: str) -> Series:
    tools = fresh_tools(work, args.tools, "sqlite")
    rnd = random.Random(args.seed)
    live = os.path.join(work, "live.db")
    copies = os.path.join(work, "sqlite-copy")
    os.makedirs(copies, exist_ok=True)
    copy = os.path.join(copies, "app.db")
    db = sqlite3.connect(live)
    db.execute("pragma journal_mode=wal")
    db.execute("create table t (id integer primary key, n integer, name text, payload blob)")
    db.execute("create index t_name on t(name)")
    rows = 0
    start = time.perf_counter()
    while _db_bytes(live) < args.sqlite_mb * MiB:
        db.executemany("insert into t values (?, ?, ?, ?)", (_row(rnd, rows + i) for i in range(20000)))
        db.commit()
        rows += 20000
        db.execute("pragma wal_checkpoint(truncate)")
    print(f"sqlite: {rows} rows, {os.path.getsize(live) / MiB:.0f} MiB in {time.perf_counter() - start:.0f} s",
          flush=True)
    series = Series(f"SQLite {sqlite3.sqlite_version}, {os.path.getsize(live) / MiB:.0f} MiB, {rows} rows, "
                    f"{args.sqlite_updates} random row updates between online-backup copies")
    for v in range(1, args.versions + 1):
        if v > 1:
            ids = rnd.sample(range(rows), args.sqlite_updates)
            db.executemany("update t set n = ?, payload = ? where id = ?",
                           ((rnd.randrange(1 << 31), _payload(rnd), i) for i in ids))
            db.commit()
        if os.path.exists(copy):
            os.remove(copy)
        dst = sqlite3.connect(copy)
        with dst:
            db.backup(dst)
        dst.close()
        back_up(series, tools, copies, v)
    db.close()
    time_restores(series, tools, copies, os.path.join(work, "sqlite"), args.restore_trials, args.restore_into)
    return series


def report(series: Series, names: list[str]) -> list[str]:
    """The table, and whether chunkvault's differential versions meet the targets."""
    lines = [series.title,
             f"{'version':>7} {'copy MiB':>9} {'tool':>11} {'seconds':>8} {'CPU s':>6} {'MiB added':>10} "
             f"{'s / restic':>11} {'CPU / restic':>13} {'MiB / restic':>13}"]
    restic = series.steps.get("restic")
    for i, size in enumerate(series.sizes):
        for n in names:
            s = series.steps[n][i]
            ratios = ""
            if restic and n != "restic":
                r = restic[i]
                ratios = (f"{s.seconds / max(r.seconds, 1e-9):>11.2f} {s.cpu / max(r.cpu, 1e-9):>13.2f} "
                          f"{s.added / max(r.added, 1):>13.3f}")
            lines.append(f"{s.version:>7} {size / MiB:>9.0f} {n:>11} {s.seconds:>8.2f} {s.cpu:>6.2f} "
                         f"{s.added / MiB:>10.1f} {ratios}")
    for name in (n for n in names if n.startswith("chunkvault")):
        if not restic or len(series.sizes) < 2:
            break
        cv = series.steps[name][1:]
        rs = restic[1:]
        byte_ratio = sum(s.added for s in cv) / max(sum(r.added for r in rs), 1)
        time_ratio = sum(s.seconds for s in cv) / max(sum(r.seconds for r in rs), 1e-9)
        cpu_ratio = sum(s.cpu for s in cv) / max(sum(r.cpu for r in rs), 1e-9)
        worst_bytes = max(s.added / max(r.added, 1) for s, r in zip(cv, rs))
        worst_time = max(s.seconds / max(r.seconds, 1e-9) for s, r in zip(cv, rs))
        lines.append(f"{name} differential versions: {byte_ratio:.3f}x restic's bytes (worst {worst_bytes:.3f}; "
                     f"target <= 0.15: {'met' if byte_ratio <= 0.15 else 'NOT met'} over the series, "
                     f"{'met' if worst_bytes <= 0.15 else 'NOT met'} by every version), "
                     f"{time_ratio:.3f}x restic's time (worst {worst_time:.2f}; target <= 0.5: "
                     f"{'met' if time_ratio <= 0.5 else 'NOT met'} over the series, "
                     f"{'met' if worst_time <= 0.5 else 'NOT met'} by every version), "
                     f"{cpu_ratio:.2f}x restic's CPU time")
        for s in series.steps[name]:
            lines.append(f"  {name} v{s.version}: {s.note}")
    if series.restores:
        lines.append("restore of the last version (fastest of the trials): " + ", ".join(
            f"{n} {min(s):.2f} s" for n, s in series.restores.items()))
        for name in (n for n in series.restores if n.startswith("chunkvault") and not n.startswith(FULL)):
            full_name = FULL + (SECRET_SUFFIX if name.endswith(SECRET_SUFFIX) else "")
            if full_name in series.restores:
                mine, full = series.restores[name], series.restores[full_name]
                ratio = min(mine) / min(full)
                # A trial restores every repository once, seconds apart: the ratio within a trial moves less with
                # the machine's speed drifting between trials.
                paired = statistics.median(a / b for a, b in zip(mine, full))
                lines.append(f"{name}: {ratio:.2f}x the restore of the same tree from a full without deltas "
                             f"({full_name}; target <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'}); "
                             f"median of the {len(mine)} trials' ratios {paired:.2f}x")
    return lines


def settings(args: argparse.Namespace) -> str:
    """The options that fix a run, as a command line that repeats it."""
    load = f"--interval {args.interval}" if args.interval else f"--transactions {args.transactions}"
    return (f"python bench/dbseries.py --scale {args.scale} --versions {args.versions} {load} "
            f"--clients {args.clients} --sqlite-mb {args.sqlite_mb} --sqlite-updates {args.sqlite_updates} "
            f"--seed {args.seed} --chunker-secret {args.chunker_secret} --tools {','.join(args.tools)}"
            + (f" --only {args.only}" if args.only else "") + f" --restore-trials {args.restore_trials}"
            + (f" --restore-into {args.restore_into}" if args.restore_into else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=40, help="pgbench scale (default 40, ~640 MiB)")
    ap.add_argument("--versions", type=int, default=4, help="copies per database (default 4)")
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--transactions", type=int, default=25000,
                      help="pgbench transactions per client between copies (default 25000)")
    load.add_argument("--interval", type=int, help="seconds of pgbench between copies instead (varies run to run)")
    ap.add_argument("--clients", type=int, default=2, help="pgbench clients (default 2)")
    ap.add_argument("--sqlite-mb", type=int, default=500, help="size of the SQLite database (default 500 MiB)")
    ap.add_argument("--sqlite-updates", type=int, default=20000, help="random row updates between versions")
    ap.add_argument("--seed", type=int, default=SEED, help=f"pgbench and SQLite update seed (default {SEED})")
    ap.add_argument("--chunker-secret", default=CHUNKER_SECRET, help="chunkvault's chunker secret, 64 hex digits")
    ap.add_argument("--only", choices=["pg", "sqlite"], help="run one series only")
    ap.add_argument("--tools", default="chunkvault,chunkvault-fixed,restic,borg")
    ap.add_argument("--restore-trials", type=int, default=3, help="timed restores of the last version, per repository")
    ap.add_argument("--restore-into", metavar="DIR",
                    help="restore below DIR (a tmpfs such as /dev/shm: the disk's write-back then decides nothing)")
    ap.add_argument("--work", default=os.path.join(HERE, ".work", "dbseries"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    args.tools = args.tools.split(",")
    try:
        FixedChunkvault.secret = bytes.fromhex(args.chunker_secret)
    except ValueError:
        ap.error("--chunker-secret must be hex")
    if len(FixedChunkvault.secret) != 32:
        ap.error("--chunker-secret must be 32 bytes (64 hex digits)")
    if args.versions < 2:
        ap.error("--versions must be at least 2 (a full and a differential)")
    unknown = {t for t in args.tools if not t.startswith("chunkvault-fixed")} - {"chunkvault", "restic", "borg"}
    if unknown:
        ap.error(f"unknown tools: {', '.join(sorted(unknown))}")
    ensure_tools()
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    print(f"{os.cpu_count()} cores; " + "; ".join(
        subprocess.run([t, "version" if t == "restic" else "--version"], capture_output=True, text=True).stdout.strip()
        for t in ("restic", "borg") if t in args.tools), flush=True)
    print("settings: " + settings(args), flush=True)
    all_series = []
    try:
        if args.only in (None, "pg"):
            all_series.append(pg_series(args, work))
        if args.only in (None, "sqlite"):
            all_series.append(sqlite_series(args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("settings: " + settings(args))
    for s in all_series:
        print()
        print("\n".join(report(s, args.tools)))


if __name__ == "__main__":
    main()
