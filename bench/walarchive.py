"""Reading a large WAL archive on S3: ``archive-list`` and a repeated ``copy --wal``, with and without the
local cache of ``wal/`` objects.

Each listing of the archive reads every ``wal/`` object (name, size, time, host, blobs); a scheduled
``copy --wal`` reads those of both repositories at each run to compare what both hold.  The cache keeps them
under the version the listing gives, so a second reading only lists.  The archive is built locally through
the API and uploaded to a moto server on 127.0.0.1 (the test suite's, ``tests/servers_s3.py``); the files are
1 MiB segments (``initdb --wal-segsize 1``) of 64 KiB of random data each, zeros after, so what is measured is
the per-object cost.  Loopback and a
Python S3 server: each GET costs more CPU and less latency than on a real bucket.

    python bench/walarchive.py [--files 2000]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from servers_s3 import TEST_CREDENTIALS, MotoServer  # noqa: E402
from walsegments import segment_bytes  # noqa: E402

PASSWORD = "bench"


def build_archive(local: str, files: int, scratch: str) -> None:
    from chunkvault import Repository

    with Repository.init(local, PASSWORD, kdf_seconds=0) as repo:
        for i in range(files):
            name = f"00000001{i // 4096:08X}{i % 4096:08X}"
            path = os.path.join(scratch, name)
            with open(path, "wb") as f:
                f.write(segment_bytes(name, 1 << 20, i, filled=1 / 16))
            repo.archive_push(path)
            os.unlink(path)


def upload(local: str, server: MotoServer, bucket: str, prefix: str) -> None:
    client = server.client()
    for root, _, names in os.walk(local):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                client.put_object(Bucket=bucket, Key=f"{prefix}/{os.path.relpath(path, local)}", Body=f.read())


def timed(env: dict[str, str], *args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", *args, "-q"], env=env, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"chunkvault {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="archived WAL files (default 2000)")
    args = parser.parse_args()
    server = MotoServer()
    server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="cv-walbench-") as scratch:
            local, dest = os.path.join(scratch, "local"), os.path.join(scratch, "dest")
            build_archive(local, args.files, scratch)
            bucket = server.create_bucket()
            upload(local, server, bucket, "repo")
            url = f"s3://{bucket}/repo"
            env = {**{k: v for k, v in os.environ.items() if not k.startswith(("CHUNKVAULT_", "AWS_"))},
                   **TEST_CREDENTIALS, "AWS_ENDPOINT_URL": server.endpoint, "AWS_CONFIG_FILE": os.devnull,
                   "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "CHUNKVAULT_PASSWORD": PASSWORD,
                   "CHUNKVAULT_TO_PASSWORD": PASSWORD, "CHUNKVAULT_CACHE_DIR": os.path.join(scratch, "cache")}
            timed(env, "init", "-r", dest)
            rows = [
                ("archive-list, no cache", timed(env, "archive-list", "-r", url, "--no-cache")),
                ("archive-list, cache empty", timed(env, "archive-list", "-r", url)),
                ("archive-list, cache filled", timed(env, "archive-list", "-r", url)),
                ("copy --wal, first (all sent)", timed(env, "copy", "-r", url, "--to", dest, "--wal")),
                ("copy --wal again, no cache", timed(env, "copy", "-r", url, "--to", dest, "--wal", "--no-cache")),
                ("copy --wal again, cache filled", timed(env, "copy", "-r", url, "--to", dest, "--wal")),
            ]
    finally:
        server.stop()
    print(f"\n{args.files} archived WAL files on S3 (moto on 127.0.0.1), {os.cpu_count()} cores\n")
    print("| operation | seconds |\n| --- | --- |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
