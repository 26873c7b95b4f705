"""chunkvault and restic backing up to the same servers, in one run: off-site storage on loopback.

SFTP to an OpenSSH server on 127.0.0.1 (both tools), S3 to a moto server
(both tools), and chunkvault's own HTTP service, ``chunkvault serve`` (restic
has no client for it: its figures stand alone).  For each remote and tool:
initial backup, a backup with nothing changed, a backup after ~1 % of the files
changed, a full restore, and what the server stores.  The network is loopback,
so this measures each client's protocol and CPU cost per byte, not a link's
bandwidth; the servers run on the same two cores as the clients.

    python bench/remotes.py [--size-mb 500] [--remotes sftp,s3,http] [--repeat 2] [--restore-into DIR] [--keep]

The servers are the test suite's (tests/servers_*.py: sshd with generated
keys, moto in server mode, ``chunkvault serve``).  Both tools open their
repositories with a password.  ``--repeat N``: the unchanged and 1 % backups
and the restore run N times, the tools taking turns; the fastest counts.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from compare import (  # noqa: E402
    Chunkvault,
    Restic,
    best,
    change_one_percent,
    du,
    fresh_dataset,
    run,
)

OPS = ("initial backup", "unchanged backup", "1% changed backup", "full restore")


class Servers:
    """The servers the remotes need, started on demand and stopped together."""

    def __init__(self, work: str):
        self.work = work
        self.running: list = []

    def sshd(self):
        from servers_ssh import SSHServer

        d = os.path.join(self.work, "sshd")
        os.makedirs(d)
        server = SSHServer(d)
        server.start()
        self.running.append(server)
        return server

    def moto(self):
        from servers_s3 import MotoServer

        server = MotoServer()
        server.start()
        self.running.append(server)
        return server

    def serve(self):
        from servers_http import ServeProcess

        d = Path(self.work, "serve")
        d.mkdir()
        server = ServeProcess(d, (), port=None, add_listen=True, add_path=True).start()
        self.running.append(server)
        return server

    def stop(self) -> None:
        for server in self.running:
            server.stop()


class RemoteChunkvault(Chunkvault):
    def __init__(self, work: str, url: str, env: dict[str, str], stored: str | None):
        super().__init__(work)
        self.env.update(env, CHUNKVAULT_REPOSITORY=url)
        self.stored = stored

    def size(self) -> int:
        return du(self.stored) if self.stored else 0


class RemoteRestic(Restic):
    def __init__(self, work: str, url: str, env: dict[str, str], options: list[str], stored: str | None):
        super().__init__(work)
        self.env.update(env, RESTIC_REPOSITORY=url)
        self.options = options
        self.stored = stored

    def size(self) -> int:
        return du(self.stored) if self.stored else 0

    def init(self):
        return run(["restic", *self.options, "init", "-q"], self.env)

    def backup(self, data, cold=False):
        return run(["restic", *self.options, "backup", "-q", data], self.env)

    def restore(self, target, cold=False):
        return run(["restic", *self.options, "restore", "-q", "latest", "--target", target], self.env)


def bucket_size(moto, bucket: str, prefix: str) -> int:
    client = moto.client()
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


def tools_for(remote: str, servers: Servers, work: str) -> list:
    """(chunkvault, restic or None) with their repositories on ``remote``."""
    tool_work = os.path.join(work, remote)
    os.makedirs(tool_work)
    if remote == "sftp":
        ssh = servers.sshd()
        cv_path, rs_path = os.path.join(tool_work, "cv-repo"), os.path.join(tool_work, "restic-repo")
        command = (f"ssh -i {ssh.user_key} -p {ssh.port} -o UserKnownHostsFile={ssh.known_hosts} "
                   f"-o StrictHostKeyChecking=yes -o BatchMode=yes {ssh.user}@127.0.0.1 -s sftp")
        return [RemoteChunkvault(tool_work, ssh.url(cv_path), ssh.env, cv_path),
                RemoteRestic(tool_work, f"sftp:{ssh.user}@127.0.0.1:{rs_path}", {}, ["-o", f"sftp.command={command}"],
                             rs_path)]
    if remote == "s3":
        from servers_s3 import S3Bucket

        moto = servers.moto()
        bucket = moto.create_bucket()
        env = S3Bucket(bucket, moto.endpoint).env
        cv = RemoteChunkvault(tool_work, f"s3://{bucket}/cv", env, None)
        rs = RemoteRestic(tool_work, f"s3:{moto.endpoint}/{bucket}/restic", env, [], None)
        cv.size = lambda: bucket_size(moto, bucket, "cv/")  # type: ignore[method-assign]
        rs.size = lambda: bucket_size(moto, bucket, "restic/")  # type: ignore[method-assign]
        return [cv, rs]
    if remote == "http":
        serve = servers.serve()
        return [RemoteChunkvault(tool_work, serve.url, {}, str(serve.path)), None]
    raise SystemExit(f"unknown remote {remote!r} (sftp, s3, http)")


def measure(tools: list, data: str, repeat: int, restore_into: str) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, tuple[float, int]]] = {t.name: {} for t in tools}
    for t in tools:
        t.init()
        results[t.name]["initial backup"] = t.backup(data)
    for r in range(repeat):
        for t in tools:
            best(results[t.name], "unchanged backup", t.backup(data))
        change_one_percent(data, seed=100 + r)
        for t in tools:
            best(results[t.name], "1% changed backup", t.backup(data))
    for _ in range(repeat):
        for t in tools:
            target = os.path.join(restore_into, f"restore-{t.name}")
            best(results[t.name], "full restore", t.restore(target))
            shutil.rmtree(target, ignore_errors=True)
    out = {t.name: {op: results[t.name][op][0] for op in OPS} for t in tools}
    for t in tools:
        out[t.name]["stored (MiB)"] = t.size() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--remotes", default="sftp,s3,http")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(HERE, ".work", "remotes"))
    ap.add_argument("--restore-into", metavar="DIR", help="restore under DIR (e.g. a tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work, data = fresh_dataset(args.work, args.size_mb, args.repeat)
    servers = Servers(work)
    rows = []
    try:
        for remote in args.remotes.split(","):
            tools = [t for t in tools_for(remote, servers, work) if t is not None]
            with tempfile.TemporaryDirectory(dir=args.restore_into or work) as into:
                results = measure(tools, data, args.repeat, into)
            cv, rs = results["chunkvault"], results.get("restic")
            for op in (*OPS, "stored (MiB)"):
                rows.append((remote, op, cv[op], rs[op] if rs else None))
    finally:
        servers.stop()
    print(f"{'remote':8}{'operation':22}{'chunkvault':>12}{'restic':>10}{'ratio':>8}")
    for remote, op, c, r in rows:
        unit = "" if op.endswith(")") else " (s)"
        other = f"{r:>10.2f}{c / max(r, 1e-9):>8.2f}" if r is not None else f"{'-':>10}{'-':>8}"
        print(f"{remote:8}{op + unit:22}{c:>12.2f}{other}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
