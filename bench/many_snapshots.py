"""Commands over a repository of many snapshots: a year of hourly ones is 8,760.

    python bench/many_snapshots.py [--count 8760] [--chain 24] [--dir DIR] [--s3]

Backs up a small tree, then writes ``count`` snapshots of it through the API, one
an hour apart: with ``--chain N``, a full snapshot then N-1 differentials on it,
each holding the one change of a real differential (what the commands read is
the snapshot objects and their chains, whatever the trees).  Then it times the
commands that read every snapshot: the listing, a backup (which looks for its
parent), a retention dry run, a check, a find, and a restore of the newest.
Seconds per command, fastest of ``--repeat``; none should grow faster than the
number of snapshots.  ``--s3``: the repository on a moto server on 127.0.0.1 (the test
suite's), with the local cache, as an off-site repository is read.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from chunkvault import Repository  # noqa: E402

PASSWORD = "bench many snapshots"
COMMANDS = [
    ["snapshots"],
    ["backup", "{src}"],
    ["forget", "--keep-hourly", "24", "--keep-daily", "30", "--keep-monthly", "12", "--dry-run"],
    ["check"],
    ["find", "f1"],
    ["restore", "latest", "--target", "{out}"],
]


def build(repo_dir: str, src: str, count: int, chain: int) -> None:
    os.makedirs(src)
    for i in range(20):
        with open(os.path.join(src, f"f{i}"), "wb") as f:
            f.write(os.urandom(1000))
    with Repository.init(repo_dir, PASSWORD, kdf_seconds=0.05) as repo:
        full = repo.backup([src], kind="full").snapshot
        with open(os.path.join(src, "f0"), "ab") as f:
            f.write(b"changed")
        diff = repo.backup([src], kind="diff").snapshot
        for s in (full, diff):
            repo.store.delete_snapshot(s.id)
        start = datetime.datetime.fromisoformat(diff.time)
        previous = None
        for i in range(count):
            t = (start - datetime.timedelta(hours=count - 1 - i)).isoformat()
            model = full if i % chain == 0 else dataclasses.replace(diff, parent=previous.id)
            previous = repo.store.save_snapshot(dataclasses.replace(model, time=t, id=""))


def timed(argv: list[str], env: dict[str, str], repeat: int, work: str) -> float:
    best = float("inf")
    for _ in range(repeat):
        args = [a.format(out=os.path.join(work, f"out{time.monotonic_ns()}")) for a in argv]
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "chunkvault.cli", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        best = min(best, time.monotonic() - started)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=8760)
    ap.add_argument("--chain", type=int, default=1, help="snapshots per chain: a full, then differentials")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    ap.add_argument("--s3", action="store_true", help="the repository on a moto S3 server on 127.0.0.1")
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="many-snapshots-")
    repo_dir, src = os.path.join(work, "repo"), os.path.join(work, "src")
    moto = None
    if args.s3:
        from servers_s3 import TEST_CREDENTIALS, MotoServer

        moto = MotoServer()
        moto.start()
        os.environ.update(TEST_CREDENTIALS, AWS_ENDPOINT_URL=moto.endpoint, AWS_CONFIG_FILE=os.devnull,
                          AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        repo_dir = f"s3://{moto.create_bucket()}/repo"
    try:
        started = time.monotonic()
        build(repo_dir, src, args.count, args.chain)
        print(f"{args.count} snapshots written in {time.monotonic() - started:.1f} s")
        env = {**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD, "CHUNKVAULT_REPOSITORY": repo_dir,
               "CHUNKVAULT_CACHE_DIR": os.path.join(work, "cache")}
        for argv in COMMANDS:
            argv = [a.replace("{src}", src) for a in argv]
            print(f"{' '.join(argv).replace(work + os.sep, ''):70} {timed(argv, env, args.repeat, work):6.2f} s")
    finally:
        if moto is not None:
            moto.stop()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
