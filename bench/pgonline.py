"""A running PostgreSQL cluster backed up two ways: a ``pg_basebackup`` copy then ``backup`` of the copy, or
``backup --postgres`` of the data directory in place.

A cluster on a free 127.0.0.1 port is filled with ``pgbench -i -s SCALE``; then, ``--versions`` times, with
``--transactions`` pgbench transactions per client between versions, each way backs the cluster up into its
own repository (both with ``--fixed-chunks 'base/*'``), one after the other.  The table gives, per version,
the wall seconds of each way (the copy's ``pg_basebackup`` and ``rm`` of the previous copy included, as a
policy's pre hook runs them), the bytes each way read from the cluster's disk or wrote to it besides the
repository (the copy: its whole size written, then read), and the MiB each repository grew by.  After the
last version, each way's last snapshot is restored and started, and its pgbench account count checked.

    python bench/pgonline.py [--scale 40] [--versions 3] [--transactions 5000] [--clients 2] [--work DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from servers_pg import PgCluster, find_pg_bindir, give_to, start_restored  # noqa: E402

MiB = 1 << 20
PASSWORD = "bench"


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def chunkvault(repo: str, *args: str, env: dict[str, str] | None = None) -> str:
    e = {**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD, **(env or {})}
    return subprocess.run([sys.executable, "-m", "chunkvault.cli", *args, "-r", repo], env=e, check=True,
                          capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=40, help="pgbench scale (default 40, ~640 MiB)")
    ap.add_argument("--versions", type=int, default=3)
    ap.add_argument("--transactions", type=int, default=5000, help="pgbench transactions per client between versions")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(HERE, ".work", "pgonline"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    bindir = find_pg_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL not found: apt-get install postgresql")
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    repos = {"copy": os.path.join(args.work, "copy-repo"), "online": os.path.join(args.work, "online-repo")}
    for repo in repos.values():
        subprocess.run([sys.executable, "-m", "chunkvault.cli", "init", "-r", repo, "-q"], check=True,
                       env={**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD})
    rows = []
    with PgCluster(bindir, settings=()) as pg:
        pg.init()
        pg.start()
        pg.pgbench("-i", "-q", "-s", str(args.scale))
        env = {"PGHOST": pg.rundir, "PGPORT": str(pg.port), "PGUSER": "postgres", "PGDATABASE": "postgres",
               "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
        copy = os.path.join(pg.backups, "copy")
        print(f"pgbench -i -s {args.scale}: data directory {du(pg.datadir) / MiB:.0f} MiB", flush=True)
        for v in range(1, args.versions + 1):
            if v > 1:
                pg.pgbench("-c", str(args.clients), "-j", str(args.clients), "-t", str(args.transactions), "-n")
            before = {k: du(r) for k, r in repos.items()}
            start = time.perf_counter()
            shutil.rmtree(copy, ignore_errors=True)
            pg.basebackup(copy)
            copied = du(copy)
            chunkvault(repos["copy"], "backup", "-q", "--fixed-chunks", "base/*", copy)
            t_copy = time.perf_counter() - start
            start = time.perf_counter()
            chunkvault(repos["online"], "backup", "-q", "--postgres", "--fixed-chunks", "base/*", pg.datadir, env=env)
            t_online = time.perf_counter() - start
            added = {k: (du(r) - before[k]) / MiB for k, r in repos.items()}
            rows.append((v, t_copy, t_online, copied, added["copy"], added["online"]))
            print(f"version {v}: copy {t_copy:.1f} s (+{added['copy']:.1f} MiB), online {t_online:.1f} s "
                  f"(+{added['online']:.1f} MiB)", flush=True)
        expected = pg.sql("select count(*) from pgbench_accounts")
        checks = {}
        for way, repo in repos.items():
            target = os.path.join(pg.base, f"restored-{way}")
            chunkvault(repo, "restore", "latest", "--target", target, "-q")
            give_to(target, pg.user, recursive=True)
            server = start_restored(bindir, target)
            try:
                checks[way] = server.sql("select count(*) from pgbench_accounts") == expected
            finally:
                server.stop()
                shutil.rmtree(server.rundir, ignore_errors=True)
                shutil.rmtree(target, ignore_errors=True)
    print()
    print("| version | pg_basebackup + backup (s) | backup --postgres (s) | ratio | copy written + read (MiB) "
          "| added, copy (MiB) | added, --postgres (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for v, t_copy, t_online, copied, a_copy, a_online in rows:
        print(f"| {v} | {t_copy:.1f} | {t_online:.1f} | {t_online / t_copy:.2f} | {2 * copied / MiB:.0f} "
              f"| {a_copy:.1f} | {a_online:.1f} |")
    print(f"\nrestored and started: {json.dumps(checks)} (pgbench_accounts count {expected})")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
