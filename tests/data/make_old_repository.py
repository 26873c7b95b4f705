#!/usr/bin/env python3
"""Write the small repository tests/test_old_repositories.py opens, with an older chunkvault's command line.

    git worktree add /tmp/cv-old 893763d && python -m venv /tmp/cv-old-venv
    /tmp/cv-old-venv/bin/pip install /tmp/cv-old
    python tests/data/make_old_repository.py --chunkvault /tmp/cv-old-venv/bin/chunkvault --commit 893763d

It writes tests/data/old-repository-COMMIT.tar.gz (the repository) and old-repository-COMMIT.json (each
snapshot's tree as it was backed up: paths, types, modes, sizes, digests, link targets, hard links,
mtimes).  What it does is what that version could: init with a password, a second password and a key secret,
a full and three differentials of a tree with empty, sparse, hard-linked, symbolically linked and oddly named
files, a database-like file edited in place under ``--fixed-chunks`` (block deltas) and another cut by
content (deltas too), a ``--stdin`` snapshot, tags, a snapshot forgotten and pruned.  Only this module's
standard library is used, so it runs with any Python that runs the old chunkvault.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
import tempfile

PASSWORD = "old-repository-password"
SECOND_PASSWORD = "old-repository-second"
HOST = "old-writer"
FIXED = ["--fixed-chunks", "db/*", "--fixed-chunk-size", "16384"]
T0 = 1_600_000_000_123_456_789  # every mtime is set: the states do not depend on when this runs


def tree_state(root: str) -> dict[str, dict]:
    """Each path below ``root`` ("" for root itself): what a restore of it must give back."""
    out: dict[str, dict] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root.encode()):
        dirnames.sort()
        names = sorted(dirnames) + sorted(filenames)
        for name in [b""] + names if dirpath == root.encode() else names:
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, root.encode()).decode(errors="surrogateescape") if name else ""
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                e = {"type": "file", "mode": stat.S_IMODE(st.st_mode), "size": st.st_size, "sha256": digest,
                     "mtime_ns": st.st_mtime_ns}
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISDIR(st.st_mode):
                e = {"type": "dir", "mode": stat.S_IMODE(st.st_mode)}
            elif stat.S_ISLNK(st.st_mode):
                e = {"type": "symlink", "target": os.readlink(path).decode(errors="surrogateescape")}
            elif stat.S_ISFIFO(st.st_mode):
                e = {"type": "fifo", "mode": stat.S_IMODE(st.st_mode)}
            else:
                raise SystemExit(f"unexpected file type: {path!r}")
            out[rel] = e
    for paths in inodes.values():
        for rel in paths:
            out[rel]["links"] = sorted(paths)
    return out


def db_pages(seed: int, pages: int) -> bytes:
    """Pages of 8 KiB, half compressible, as a database file's."""
    r = random.Random(seed)
    return b"".join((b"page%06d" % i) * 400 + r.randbytes(8192 - 4000) for i in range(pages))


def edit_in_place(path: str, seed: int, count: int) -> None:
    r = random.Random(seed)
    with open(path, "r+b") as f:
        pages = os.fstat(f.fileno()).st_size // 8192
        for _ in range(count):
            f.seek(r.randrange(pages) * 8192 + r.randrange(4000))
            f.write(r.randbytes(100))


def write(path: str, data: bytes, mode: int = 0o644, mtime: int = T0) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime, mtime))


def step(src: str, n: int) -> None:
    """Change the tree in ``src`` into its state ``n``."""
    j = lambda *p: os.path.join(src, *p)  # noqa: E731
    t = T0 + n * 1_000_000_007
    if n == 0:
        os.chmod(src, 0o755)
        for d in ("db", "content", "hl/sub", "ln", "odd"):
            os.makedirs(j(d))
        os.makedirs(j("private"), mode=0o700)
        write(j("empty"), b"")
        write(j("small.txt"), b"hello\n")
        write(j("db/16384"), db_pages(1, 16))  # 128 KiB, cut at fixed offsets
        write(j("content/blob.bin"), db_pages(2, 12))  # cut by content
        with open(j("sparse.img"), "wb") as f:
            f.truncate(2 << 20)
            f.seek(1 << 20)
            f.write(b"X" * 3000)
        os.utime(j("sparse.img"), ns=(t, t))
        write(j("hl/a"), random.Random(3).randbytes(5000))
        os.link(j("hl/a"), j("hl/b"))
        os.link(j("hl/a"), j("hl/sub/c"))
        os.symlink("../small.txt", j("ln/rel"))
        os.symlink("/nonexistent/x", j("ln/dangling"))
        os.symlink("../db", j("ln/dir"))
        for name in (b"sp ace", b"new\nline", "\u00fcn\u00efc\u00f6d\u00e9".encode(), b"\xff\xfe-latin", b"-dash",
                     b"*star?", b"back\\slash", b"a" * 200):
            write(os.path.join(src.encode(), b"odd", name).decode(errors="surrogateescape"), name * 3)
        write(j("private/key"), b"secret", 0o600)
        write(j("run.sh"), b"#!/bin/sh\necho hi\n", 0o755)
        os.mkfifo(j("fifo"))
    elif n == 1:
        edit_in_place(j("db/16384"), 11, 4)
        write(j("small.txt"), b"hello\nmore\n", mtime=t)
        os.remove(j("run.sh"))
        write(j("new1"), random.Random(12).randbytes(3000), mtime=t)
        os.chmod(j("private/key"), 0o640)
    elif n == 2:
        edit_in_place(j("db/16384"), 21, 3)
        edit_in_place(j("content/blob.bin"), 22, 2)
        os.remove(j("hl/b"))
        write(j("hl/b"), b"no longer a link", mtime=t)
        os.remove(j("ln/rel"))
        os.symlink("../new1", j("ln/rel"))
        shutil.rmtree(j("private"))
        os.makedirs(j("newdir/deep"))
        write(j("newdir/deep/f"), b"deep\n", mtime=t)
    elif n == 3:
        edit_in_place(j("db/16384"), 31, 3)
        with open(j("db/16385"), "wb") as f:
            f.write(db_pages(33, 2))
        os.remove(j("new1"))
        os.makedirs(j("new1"))  # a file replaced by a directory
        write(j("new1/inside"), b"inside\n", mtime=t)
    else:  # the reader's own differentials (tests/test_old_repositories.py)
        edit_in_place(j("db/16384"), 10 * n + 1, 3)
        edit_in_place(j("content/blob.bin"), 10 * n + 2, 2)
        write(j(f"added{n}"), b"added %d\n" % n, mtime=t)
    for d in ("", "db", "content", "hl", "hl/sub", "ln", "odd", "newdir", "newdir/deep", "new1"):
        if os.path.isdir(j(d)) and not os.path.islink(j(d)):
            os.utime(j(d), ns=(t, t))


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunkvault", required=True, help="the older chunkvault's command")
    p.add_argument("--commit", required=True, help="the commit it was installed from (names the files)")
    p.add_argument("--out", default=here)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="cv-old-repo-")
    repo, src = os.path.join(work, "repo"), os.path.join(work, "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env.update(CHUNKVAULT_PASSWORD=PASSWORD, HOME=work, XDG_CACHE_HOME=os.path.join(work, "cache"),
               XDG_STATE_HOME=os.path.join(work, "state"))

    def cv(*a: str, data: bytes | None = None, **extra: str) -> dict:
        k = 2 if a[0] == "key" else 1
        proc = subprocess.run([args.chunkvault, *a[:k], "-r", repo, *a[k:]], input=data, capture_output=True,
                              env={**env, **extra}, check=True)
        return json.loads(proc.stdout) if "--json" in a else {}

    secret = os.path.join(work, "secret")
    cv("init", "--kdf-time", "0.01", "--chunk-avg", "16384", "--pack-size", "65536")
    cv("key", "add", "--kdf-time", "0.01", CHUNKVAULT_NEW_PASSWORD=SECOND_PASSWORD)
    cv("key", "add", "--generate-secret", secret)
    os.makedirs(src)
    snapshots = []
    for n in range(4):
        step(src, n)
        result = cv("backup", src, "--json", "--host", HOST, *FIXED, *(["--tag", "base"] if n == 0 else []))
        snapshots.append({"id": result["id"], "step": n, "parent": result["parent"],
                          "delta_blobs": result["stats"]["delta_blobs"], "tree": tree_state(src)})
    dump = random.Random(77).randbytes(20000) + b"-- end of dump\n"
    result = cv("backup", "--stdin", "--stdin-name", "app.sql", "--json", "--host", HOST, "--tag", "dump", data=dump)
    stdin = {"id": result["id"], "name": "app.sql", "size": len(dump), "sha256": hashlib.sha256(dump).hexdigest()}
    extra = os.path.join(work, "extra")
    os.makedirs(extra)
    write(os.path.join(extra, "x"), random.Random(55).randbytes(30000))
    forgotten = cv("backup", extra, "--json", "--host", HOST)["id"]
    cv("forget", forgotten)
    cv("prune")
    cv("check", "--read-data")
    with open(secret) as f:
        secret_text = f.read().strip()
    name = f"old-repository-{args.commit}"
    with tarfile.open(os.path.join(args.out, name + ".tar.gz"), "w:gz") as tar:
        for entry in sorted(os.listdir(repo)):
            if entry not in ("locks", ".reserve"):
                tar.add(os.path.join(repo, entry), arcname=os.path.join("repo", entry))
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({"written_by": args.commit, "password": PASSWORD, "second_password": SECOND_PASSWORD,
                   "secret": secret_text, "host": HOST, "source": src, "fixed_chunks": FIXED,
                   "snapshots": snapshots, "stdin": stdin, "forgotten": forgotten}, f, indent=1)
        f.write("\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
