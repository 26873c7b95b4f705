"""Throughput of the C chunker beside keyed BLAKE3 and zstd level 3, on the same bytes.

Two inputs of the same size: random bytes, and real files from system
directories concatenated.  Each figure is MB/s (10**6 bytes per second of
wall time, best of several runs) with 1 thread and with 2 threads (each
thread takes half the input).  BLAKE3 and zstd run on 1 MiB blocks, as the
backup pipeline feeds them; the chunker runs on the whole buffer (its
`cut_points`) and, for the streaming path, through `Chunker.chunks()` on an
in-memory file (which also copies every chunk out).

    python bench/chunker.py [--mb 256] [--tree /usr/lib ...] [--repeat 3]
"""
from __future__ import annotations

import argparse
import io
import os
import threading
import time
from typing import Callable

import blake3
import zstandard

from chunkvault.chunker import DEFAULT_PARAMS, Chunker, ChunkerParams

MIB = 1 << 20
BLOCK = MIB


def real_files(roots: list[str], size: int) -> bytes:
    """Up to `size` bytes of regular files under `roots`, in sorted walk order."""
    parts: list[bytes] = []
    total = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                try:
                    with open(path, "rb") as f:
                        data = f.read(size - total)
                except OSError:
                    continue
                parts.append(data)
                total += len(data)
                if total >= size:
                    return b"".join(parts)
    return b"".join(parts)


def timed(threads: int, work: Callable[[memoryview], object], data: bytes, repeat: int) -> float:
    """Best MB/s of `work` over `data`, split into one contiguous part per thread."""
    view = memoryview(data)
    step = len(data) // threads
    parts = [view[i * step:(i + 1) * step if i < threads - 1 else len(data)] for i in range(threads)]
    best = 0.0
    for _ in range(repeat):
        pool = [threading.Thread(target=work, args=(p,)) for p in parts]
        start = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        best = max(best, len(data) / (time.perf_counter() - start) / 1e6)
    return best


def blocks(view: memoryview):
    for i in range(0, len(view), BLOCK):
        yield view[i:i + BLOCK]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="MiB per input")
    ap.add_argument("--tree", nargs="+", default=["/usr/lib", "/usr/share"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    size = args.mb * MIB
    key = os.urandom(32)
    inputs = {"random": os.urandom(size), "real files": real_files(args.tree, size)}
    p = DEFAULT_PARAMS
    chunker = Chunker(key, p)
    small = ChunkerParams(min_size=16 << 10, avg_size=64 << 10, max_size=512 << 10)
    chunker_small = Chunker(key, small)

    def chunk(view: memoryview) -> None:
        chunker.cut_points(view)

    def chunk_small(view: memoryview) -> None:
        chunker_small.cut_points(view)

    def chunk_stream(view: memoryview) -> None:
        for _ in chunker.chunks(io.BytesIO(view), bufsize=8 * MIB):
            pass

    def hash_keyed(view: memoryview) -> None:
        for b in blocks(view):
            blake3.blake3(b, key=key).digest()

    def zstd3(view: memoryview) -> None:
        cctx = zstandard.ZstdCompressor(level=3)  # one per thread: not thread-safe
        for b in blocks(view):
            cctx.compress(b)

    work: list[tuple[str, Callable[[memoryview], None]]] = [
        (f"chunker C cut_points, avg {p.avg_size // 1024} KiB (default)", chunk),
        (f"chunker C cut_points, avg {small.avg_size // 1024} KiB", chunk_small),
        (f"chunker C chunks() stream, avg {p.avg_size // 1024} KiB", chunk_stream),
        ("BLAKE3 keyed, 1 MiB blocks", hash_keyed),
        ("zstd level 3, 1 MiB blocks", zstd3),
    ]
    print(f"MB/s (10^6 B/s), best of {args.repeat}; inputs of {size // MIB} MiB; "
          f"default params {p.to_dict()}")
    for name, data in inputs.items():
        n_chunks = len(chunker.cut_points(data))
        print(f"\n{name}: {len(data) // MIB} MiB, {n_chunks} chunks at default params "
              f"(mean {len(data) / n_chunks / 1024:.0f} KiB)")
        print(f"  {'':<48} {'1 thread':>10} {'2 threads':>10}")
        for label, fn in work:
            one = timed(1, fn, data, args.repeat)
            two = timed(2, fn, data, args.repeat)
            print(f"  {label:<48} {one:10.0f} {two:10.0f}", flush=True)


if __name__ == "__main__":
    main()
