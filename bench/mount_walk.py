"""Walking a mounted snapshot: ``find -ls`` (a stat of every entry) and ``find -name`` (names alone).

    python bench/mount_walk.py                     # 100,000 files in 200 directories
    python bench/mount_walk.py --files 20000 --per-dir 100

The tree is made of small files (0-300 random bytes), backed up into a new
repository, and mounted with ``chunkvault mount``; each walk runs once on a
fresh mount (cold: the snapshot's tree read from the repository, nothing in the
kernel's caches) and once again on the same mount (warm: within the 30 s the
kernel keeps what it was told). Needs FUSE (``/dev/fuse`` and fusermount3).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

PASSWORD = "bench"


def make_tree(root: str, files: int, per_dir: int, rnd: random.Random) -> None:
    for n in range(files):
        d = os.path.join(root, f"d{n // per_dir:04}", f"sub{n % 7}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{n:06}"), "wb") as f:
            f.write(rnd.randbytes(rnd.randrange(300)))


def chunkvault(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD}
    return subprocess.run([sys.executable, "-m", "chunkvault.cli", *args], env=env, check=True,
                          stdout=subprocess.DEVNULL, **kwargs)


class Mounted:
    """``chunkvault mount`` of ``repo`` at ``mnt`` in a process of its own, unmounted at the end."""

    def __init__(self, repo: str, mnt: str):
        self.repo, self.mnt = repo, mnt

    def __enter__(self) -> str:
        env = {**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD}
        self.proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "mount", "-r", self.repo, self.mnt],
                                     env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.isdir(os.path.join(self.mnt, "snapshots")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the mount did not come up")
            time.sleep(0.1)
        return os.path.join(self.mnt, "snapshots", "latest")

    def __exit__(self, *exc: object) -> None:
        subprocess.run([shutil.which("fusermount3") or "fusermount", "-u", self.mnt], check=False)
        self.proc.wait(timeout=60)


def timed(*cmd: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--per-dir", type=int, default=500, help="files per directory (in 7 subdirectories)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mount-walk-") as tmp:
        src, repo, mnt = (os.path.join(tmp, name) for name in ("src", "repo", "mnt"))
        make_tree(src, args.files, args.per_dir, random.Random(1))
        os.mkdir(mnt)
        chunkvault("init", "-r", repo, "--kdf-time", "0")
        chunkvault("backup", "-r", repo, src)
        rows = []
        for walk, flags in (("find -ls", ["-ls"]), ("find -name", ["-name", "no-such-name"])):
            with Mounted(repo, mnt) as latest:
                cold = timed("find", latest + "/", *flags)
                warm = timed("find", latest + "/", *flags)
            rows.append((walk, cold, warm))
        print(f"{args.files:,} files; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print("| walk | cold (s) | warm (s) |\n| --- | --- | --- |")
        for walk, cold, warm in rows:
            print(f"| `{walk}` | {cold:.2f} | {warm:.2f} |")


if __name__ == "__main__":
    main()
