"""chunkvault beside restic and borg on the same data, in one run.

Builds a data set of real files from this machine (system libraries and the
Python standard library by default), then times for each tool: initial
backup, a backup with nothing changed, a backup after ~1 % of the files
changed, a full restore, `check --read-data`, repository size and the peak
memory of each operation (peak RSS; for a command running several processes
at once, their summed proportional set sizes if larger: see TreeMemory).
Prints figures and ratios to restic.

    python bench/compare.py [--size-mb 2000] [--repeat 3] [--tools chunkvault,restic,borg] [--work DIR] [--keep]
                            [--restore-into DIR] [--cold] [--lean-cache] [--small-files N]

``--tools`` may add ``chunkvault+secret``: chunkvault opened with a generated
key secret (``init --generate-secret``) instead of a password, so no command
spends the password's derivation (0.5 s of CPU, 32 MiB).

With ``--repeat N`` the initial backup (each run after the first into a
new repository), the unchanged backup, the 1 % backup (a new 1 % each
time), the restore and the check run N times, the tools taking turns, and
the fastest run counts: on a shared machine that filters out other load.
Each round's initial backup times are printed too.

``--cold`` (root, Linux) adds an initial backup into a second repository and a
full restore, each started with the page cache emptied: read from the disk,
as a first backup of a machine or a restore after a while are.

``--small-files N`` replaces the real files with N small ones of 0-8 KiB, a
thousand to a directory: where the cost is per file, not per byte.

``--lean-cache`` (root, Linux): each restore and check starts with the page
cache emptied and then only the tool's repository and caches read back in
(and its program, by listing the snapshots once, untimed).
On a virtual machine whose page cache holds the benchmark's other copies (the
data set, the other tools' repositories), writing 2 GB of new files into
tmpfs cost every tool 2-5 s more kernel time than with a lean cache, the same
for all three, which blurs the ratios; this takes that out.

Untimed, before every backup the data set is read into the page cache
(``warm``: borg drops it), and before every full restore into a tmpfs as
much memory is written there and freed (``prefault``: on a virtual machine
that hands freed memory back to its host, whichever tool first took new
pages after a long command paid for the host's faults).  A restored tree is
removed only after every tool's restore of the round, and then, on a disk,
the next round waits out the kernel's window for recently deleted inodes
(``settle``): ext4 without a journal passes over each inode freed in the last
minute when it allocates one: a restore of 48,000 files started just after
another tool's tree was removed spent 60 % of its samples there and took
10.3-10.7 s against 6.1-6.5 s a minute later, so whichever tool came after
another in a round was slowed.

restic and borg are installed with apt-get when missing.  Compression is on
for all three (restic: auto, borg: zstd,3, chunkvault: zstd 3).
"""
from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PASSWORD = "bench-password"
SECRET_SUFFIX = "+secret"


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
        found.append(p)
    return found


def _tree_pss_kib(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except OSError:
            pass
    return total


class TreeMemory:
    """Peak memory of a command that may run several processes at once.

    wait4's peak RSS is that of the largest single process. While the command
    has more than one process, the proportional set sizes of all of them
    (pages shared between forked processes counted once) are summed every
    ``interval`` seconds; the peak is the larger of the two measures.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(self.interval):
            pids = _descendants(self.pid)
            if len(pids) > 1:
                self.peak_kib = max(self.peak_kib, _tree_pss_kib(pids))

    def finish(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak_kib


def drop_caches() -> None:
    """Empty the page cache, so the next command reads from the disk."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold empties the page cache, which needs root on Linux: {exc}") from None


def warm(data: str) -> None:
    """Read the data set into the page cache (untimed), as the backups are documented to find it: borg's
    `create` drops the pages of every file it reads (POSIX_FADV_DONTNEED), so the tool after it read
    the whole data set from the disk (4-5 s more for 2 GB) where the others did not."""
    for dirpath, _, files in os.walk(data):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    while f.read(1 << 20):
                        pass


def _is_tmpfs(path: str) -> bool:
    path = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, fstype = line.split()[:3]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, fstype
    return kind == "tmpfs"


RECENTLY_DELETED_SECONDS = 61  # ext4 (fs/ext4/ialloc.c, RECENTCY_MIN) skips inodes freed this recently


def settle(targets: list[str]) -> None:
    """Remove restored trees (untimed) so that the next restore does not pay for their deletion: see the
    module docstring.  On a tmpfs, freed inodes cost nothing later."""
    on_disk = [t for t in targets if os.path.exists(t) and not _is_tmpfs(t)]
    for t in targets:
        shutil.rmtree(t, ignore_errors=True)
    if on_disk:
        os.sync()
        time.sleep(RECENTLY_DELETED_SECONDS)


def prefault(directory: str | None, nbytes: int) -> None:
    """Before a restore into a tmpfs: write ``nbytes`` there and remove them (untimed), so the restore's
    new pages are memory the guest already holds.  On a virtual machine that hands freed memory back to
    its host (virtio-balloon free page reporting), the first command to take gigabytes of new pages
    after a long one paid for the host's faults: 2.5x the time of the same restore run just after
    (kernel time copying into tmpfs pages 3-4x), whichever tool came first in a round."""
    if directory is None or not _is_tmpfs(directory):
        return
    block = bytes(1 << 20)
    path = os.path.join(directory, f".prefault-{os.getpid()}")
    try:
        with open(path, "wb") as f:
            for _ in range(nbytes >> 20):
                f.write(block)
    finally:
        os.unlink(path)


def run(cmd: list[str], env: dict[str, str] | None = None, stdin: bytes | None = None,
        cwd: str | None = None, cold: bool = False) -> tuple[float, int]:
    """(wall seconds, peak memory in KiB: see TreeMemory) of one command; fails loudly.

    Dirty pages are written out first, untimed: otherwise the writeback of a data copy, or of the
    previous tool's repository, lands in whichever command happens to run next.  ``cold``: the page
    cache is emptied too.
    """
    os.sync()
    if cold:
        drop_caches()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    memory = TreeMemory(proc.pid)
    if stdin is not None:
        proc.stdin.write(stdin)  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    tree_peak = memory.finish()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}): {err.decode(errors='replace')[-2000:]}")
    return elapsed, max(usage.ru_maxrss, tree_peak)


def du(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def build_dataset(dest: str, size_mb: int) -> tuple[int, int]:
    """Copy real files (regular files only) until ``size_mb`` MiB; returns (files, bytes)."""
    sources = ["/usr/lib", "/usr/share", os.path.dirname(os.__file__), "/usr/bin"]
    budget = size_mb << 20
    files = total = 0
    for src in sources:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                try:
                    size = os.path.getsize(p)
                except OSError:
                    continue
                if total + size > budget:
                    continue
                rel = os.path.relpath(p, "/")
                out = os.path.join(dest, rel)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                try:
                    shutil.copyfile(p, out)
                except OSError:
                    continue
                files += 1
                total += size
            if total >= budget * 0.999:
                return files, total
    return files, total


def build_small_files(dest: str, count: int, seed: int = 1) -> tuple[int, int]:
    """``count`` files of 0-8 KiB, a thousand to a directory (a mail spool, a source tree, a cache), each a
    stretch of the Python standard library's sources, so they compress as real text does; (files, bytes)."""
    pool = bytearray()
    for dirpath, dirnames, filenames in os.walk(os.path.dirname(os.__file__)):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".py") and len(pool) < 32 << 20:
                with open(os.path.join(dirpath, name), "rb") as f:
                    pool += f.read()
    rnd = random.Random(seed)
    total = 0
    for i in range(count):
        if i % 1000 == 0:
            d = os.path.join(dest, f"d{i // 1000:04d}")
            os.makedirs(d)
        size = rnd.randrange(8 << 10)
        start = rnd.randrange(len(pool) - size)
        with open(os.path.join(d, f"f{i:07d}"), "wb") as f:
            f.write(pool[start:start + size])
        total += size
    return count, total


def fresh_dataset(work: str, size_mb: int, repeat: int, small_files: int = 0) -> tuple[str, str]:
    """(work directory, data set in it): the tools installed, ``work`` emptied, the data set built and
    described."""
    ensure_tools()
    work = os.path.abspath(work)
    shutil.rmtree(work, ignore_errors=True)
    data = os.path.join(work, "data")
    os.makedirs(data)
    files, total = build_small_files(data, small_files) if small_files else build_dataset(data, size_mb)
    print(f"data set: {files} files, {total / 2**20:.0f} MiB; {os.cpu_count()} cores; best of {repeat}")
    return work, data


def one_small_file(root: str) -> str:
    """A small file from the middle of the data set (by path), relative to ``root``."""
    paths = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    small = [p for p in paths if os.path.getsize(os.path.join(root, p)) < 16 << 10
             and not any(c in p for c in "*?[]\\")]  # an include pattern names it literally
    return small[len(small) // 2]


def change_one_percent(root: str, seed: int = 1) -> int:
    rnd = random.Random(seed)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    chosen = rnd.sample(paths, max(1, len(paths) // 100))
    for p in chosen:
        with open(p, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(rnd.randrange(size) if size else 0)
            f.write(rnd.randbytes(64))
    return len(chosen)


def ensure_tools() -> None:
    missing = [t for t in ("restic", "borg") if shutil.which(t) is None]
    if missing:
        pkgs = {"restic": "restic", "borg": "borgbackup"}
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *[pkgs[m] for m in missing]], check=True)


class Tool:
    name = ""

    def __init__(self, work: str):
        self.repo = os.path.join(work, f"repo-{self.name}")
        self.env = {**os.environ}
        self.state = [self.repo]  # what its commands read: the repository and the tool's caches

    def list_snapshots(self) -> tuple[float, int]:
        raise NotImplementedError

    def lean_cache(self) -> None:
        """Empty the page cache, then read the tool's repository, caches and program back in (``--lean-cache``)."""
        os.sync()
        drop_caches()
        for top in self.state:
            for d, _, files in os.walk(top):
                for f in files:
                    with open(os.path.join(d, f), "rb") as fh:
                        while fh.read(1 << 20):
                            pass
        self.list_snapshots()

    def size(self) -> int:
        return du(self.repo)

    def twin(self, work: str) -> "Tool":
        """The same tool with its repository and caches under ``work``."""
        return type(self)(work)


@functools.cache
def compile_bytecode() -> None:
    """Compile chunkvault's modules, as installing it does.  An editable checkout run where
    PYTHONDONTWRITEBYTECODE is set compiles every module again at each command (about 60 ms,
    a tenth of a backup of an unchanged tree), which no installed copy does and which restic
    (compiled) and borg (installed with its bytecode) do not pay either."""
    import compileall

    import chunkvault
    import chunkvault.chunker
    import chunkvault.remotes
    import chunkvault.store

    for package in (chunkvault, chunkvault.chunker, chunkvault.remotes, chunkvault.store):
        compileall.compile_dir(os.path.dirname(package.__file__), maxlevels=0, quiet=1)


class Chunkvault(Tool):
    """chunkvault opened with the password, as restic and borg are; named ``chunkvault+secret``
    when opened with a generated key secret instead (no password derivation at each command)."""

    name = "chunkvault"

    def __init__(self, work: str, secret: bool = False):
        if secret:
            self.name += SECRET_SUFFIX
        compile_bytecode()
        super().__init__(work)
        self.env.update(CHUNKVAULT_REPOSITORY=self.repo,
                        XDG_CACHE_HOME=os.path.join(work, "chunkvault-cache"),
                        XDG_STATE_HOME=os.path.join(work, "chunkvault-state"))
        self.state += [self.env["XDG_CACHE_HOME"], self.env["XDG_STATE_HOME"]]
        self.secret_file = os.path.join(work, f"{self.name}.key") if secret else None
        if self.secret_file:
            self.env["CHUNKVAULT_PASSWORD_FILE"] = self.secret_file
        else:
            self.env["CHUNKVAULT_PASSWORD"] = PASSWORD
        self.cmd = [sys.executable, "-m", "chunkvault.cli"]

    def init(self):
        if self.secret_file:
            return run(self.cmd + ["init", "-q", "--generate-secret", self.secret_file], self.env)
        return run(self.cmd + ["init", "-q"], self.env)

    def twin(self, work: str) -> "Chunkvault":
        return Chunkvault(work, secret=self.secret_file is not None)

    def backup(self, data, cold=False):
        return run(self.cmd + ["backup", "-q", data], self.env, cold=cold)

    def restore(self, target, cold=False):
        return run(self.cmd + ["restore", "-q", "latest", "--target", target], self.env, cold=cold)

    def list_snapshots(self):
        return run(self.cmd + ["snapshots"], self.env)

    def restore_one(self, target, data, rel):
        return run(self.cmd + ["restore", "-q", "latest", "--target", target, "--include", rel], self.env)

    def check(self):
        return run(self.cmd + ["check", "-q", "--read-data"], self.env)


class Restic(Tool):
    name = "restic"

    def __init__(self, work: str):
        super().__init__(work)
        self.env.update(RESTIC_PASSWORD=PASSWORD, RESTIC_REPOSITORY=self.repo,
                        RESTIC_CACHE_DIR=os.path.join(work, "restic-cache"))
        self.state.append(self.env["RESTIC_CACHE_DIR"])

    def init(self):
        return run(["restic", "init", "-q"], self.env)

    def backup(self, data, cold=False):
        return run(["restic", "backup", "-q", data], self.env, cold=cold)

    def restore(self, target, cold=False):
        return run(["restic", "restore", "-q", "latest", "--target", target], self.env, cold=cold)

    def list_snapshots(self):
        return run(["restic", "snapshots"], self.env)

    def restore_one(self, target, data, rel):
        return run(["restic", "restore", "-q", "latest", "--target", target, "--include", os.path.join(data, rel)],
                   self.env)

    def check(self):
        return run(["restic", "check", "-q", "--read-data"], self.env)


class Borg(Tool):
    name = "borg"

    def __init__(self, work: str):
        super().__init__(work)
        self.env.update(BORG_PASSPHRASE=PASSWORD, BORG_REPO=self.repo,
                        BORG_BASE_DIR=os.path.join(work, "borg-base"), BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
        self.state.append(self.env["BORG_BASE_DIR"])
        self.n = 0

    def init(self):
        return run(["borg", "init", "-e", "repokey-blake2"], self.env)

    def backup(self, data, cold=False):
        self.n += 1
        return run(["borg", "create", "--compression", "zstd,3", f"::a{self.n}", data], self.env, cold=cold)

    def restore(self, target, cold=False):
        os.makedirs(target, exist_ok=True)
        return run(["borg", "extract", f"{self.repo}::a{self.n}"], self.env, cwd=target, cold=cold)

    def list_snapshots(self):
        return run(["borg", "list"], self.env)

    def restore_one(self, target, data, rel):
        os.makedirs(target, exist_ok=True)
        return run(["borg", "extract", f"{self.repo}::a{self.n}", os.path.join(data, rel).lstrip("/")], self.env,
                   cwd=target)

    def check(self):
        return run(["borg", "check", "--verify-data"], self.env)


def kernel_limits(root: str, level: int = 3) -> dict[str, float]:
    """Seconds the native kernels need for the data set on all cores, with no overhead at all.

    Per byte, single-threaded, page cache warm: a backup must read, chunk, hash
    (keyed BLAKE3), compress (zstd) and seal (AES-256-GCM); a restore must open,
    decompress and hash what it writes; ``check --read-data`` the same without
    writing.  Each sum divided by the cores is a floor no implementation can beat.
    """
    import blake3
    import zstandard

    from chunkvault.chunker import Chunker
    from chunkvault.store.blob import KIND_ZSTD, compress
    from chunkvault.store.crypto import BlobHasher, Sealer

    chunker = Chunker(os.urandom(32))
    hasher, sealer = BlobHasher(os.urandom(32)), Sealer(os.urandom(32))
    dctx = zstandard.ZstdDecompressor()
    cost = dict.fromkeys(("read", "chunk", "hash", "compress", "seal", "open", "decompress", "digest"), 0.0)
    clock = time.perf_counter
    for dirpath, _, names in os.walk(root):  # warm the page cache, as the timed runs found it
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 20):
                    pass
    for dirpath, _, names in os.walk(root):
        for name in names:
            t = clock()
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            cost["read"] += clock() - t
            t = clock()
            cuts = chunker.cut_points(data)
            cost["chunk"] += clock() - t
            start = 0
            for end in cuts:
                piece = data[start:end]
                start = end
                t0 = clock()
                hasher(piece)
                t1 = clock()
                kind, packed = compress(piece, level)  # chunkvault's parameters; raw where zstd saves little
                t2 = clock()
                sealed = sealer.seal(packed, b"")
                t3 = clock()
                opened = sealer.open(sealed, b"")
                t4 = clock()
                plain = dctx.decompress(opened, max_output_size=len(piece)) if kind == KIND_ZSTD else opened
                t5 = clock()
                blake3.blake3(plain).digest()
                t6 = clock()
                cost["hash"] += t1 - t0
                cost["compress"] += t2 - t1
                cost["seal"] += t3 - t2
                cost["open"] += t4 - t3
                cost["decompress"] += t5 - t4
                cost["digest"] += t6 - t5
    cores = os.cpu_count() or 1
    backup = sum(cost[k] for k in ("read", "chunk", "hash", "compress", "seal"))
    read_back = sum(cost[k] for k in ("open", "decompress", "digest"))
    print("single-core kernel seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in cost.items()))
    return {"initial backup": backup / cores, "full restore": read_back / cores, "check --read-data": read_back / cores}


def best(results: dict[str, tuple[float, int]], op: str, measured: tuple[float, int]) -> None:
    """Keep the fastest time and the highest peak memory of an operation's runs."""
    old = results.get(op)
    results[op] = measured if old is None else (min(old[0], measured[0]), max(old[1], measured[1]))


def initial_rounds(tools: list[Tool], data: str, work: str, repeat: int,
                   results: dict[str, dict[str, tuple[float, int]]]) -> None:
    """With ``--repeat N``, N - 1 more initial backups, each tool into a new repository, tools taking turns;
    the fastest counts, as for the other operations.  Every round's times are printed: on a shared machine
    one tool's initial backup moved by a third between runs, so a single run's ratio says little."""
    rounds = [{t.name: results[t.name]["initial backup"][0] for t in tools}]
    for r in range(1, repeat):
        scratch = os.path.join(work, "initial")
        os.makedirs(scratch)
        times = {}
        for t in tools:
            twin = t.twin(scratch)
            twin.init()
            warm(data)
            measured = twin.backup(data)
            times[t.name] = measured[0]
            best(results[t.name], "initial backup", measured)
            shutil.rmtree(twin.repo)
        shutil.rmtree(scratch)
        rounds.append(times)
    if repeat > 1:
        for r, times in enumerate(rounds, 1):
            line = ", ".join(f"{n} {s:.2f} s" for n, s in times.items())
            if "restic" in times:
                line += " (" + ", ".join(f"{n} {s / times['restic']:.2f}x" for n, s in times.items()
                                         if n != "restic") + " restic's)"
            print(f"initial backup, round {r}: {line}")


def interpreter_start() -> tuple[float, float]:
    """Seconds this interpreter takes to start and end, best of five: as it is, and without the site
    packages' start-up (``-S``).  A site-packages whose ``.pth`` files import modules at every start (a
    certificate bundle's hook, editable installs' finders) adds its cost to every chunkvault command: 70 ms
    on one machine, a quarter of an unchanged backup."""
    def best(flags: list[str]) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            subprocess.run([sys.executable, *flags, "-c", "pass"], check=True)
            times.append(time.perf_counter() - t)
        return min(times)
    return best([]), best(["-S"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=2000)
    ap.add_argument("--work", default=os.path.join(HERE, ".work", "compare"))
    ap.add_argument("--tools", default="chunkvault,restic,borg")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the repeatable operations this many times, tools alternating; the fastest counts")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--cold", action="store_true",
                    help="also time an initial backup and a restore with the page cache emptied first (root)")
    ap.add_argument("--restore-into", metavar="DIR",
                    help="restore under DIR (e.g. a tmpfs), so that one tool's write-back does not slow the next")
    ap.add_argument("--lean-cache", action="store_true",
                    help="start each restore and check with only the tool's repository and caches in the page "
                         "cache (root)")
    ap.add_argument("--small-files", type=int, default=0, metavar="N",
                    help="instead of real files, N small ones (0-8 KiB of text, a thousand to a directory)")
    args = ap.parse_args()
    started, bare = interpreter_start()
    if started - bare > 0.02:
        print(f"note: this Python starts in {started * 1000:.0f} ms, {bare * 1000:.0f} ms without its site "
              "packages' start-up files, which every chunkvault command pays; for chunkvault's own figures, run "
              "this from a virtual environment holding chunkvault alone")
    lean = (lambda t: t.lean_cache()) if args.lean_cache else (lambda t: None)
    work, data = fresh_dataset(args.work, args.size_mb, args.repeat, args.small_files)
    data_bytes = sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(data) for f in files)
    classes = {"chunkvault": Chunkvault, "restic": Restic, "borg": Borg}
    tools = [Chunkvault(work, secret=True) if t == "chunkvault" + SECRET_SUFFIX else classes[t](work)
             for t in args.tools.split(",")]
    results: dict[str, dict[str, tuple[float, int]]] = {t.name: {} for t in tools}
    for t in tools:
        t.init()
        warm(data)
        results[t.name]["initial backup"] = t.backup(data)
        results[t.name]["repository size"] = (t.size() / 2**20, 0)
    initial_rounds(tools, data, work, args.repeat, results)
    changed = 0
    one = one_small_file(data)
    for r in range(args.repeat):
        for t in tools:
            warm(data)
            best(results[t.name], "unchanged backup", t.backup(data))
        changed = change_one_percent(data, seed=r + 1)
        for t in tools:
            warm(data)
            best(results[t.name], "1% changed backup", t.backup(data))
    targets = [os.path.join(args.restore_into or work, f"restore-{t.name}") for t in tools]
    for _ in range(args.repeat):
        for t, target in zip(tools, targets):
            lean(t)
            prefault(args.restore_into, data_bytes)
            best(results[t.name], "full restore", t.restore(target))
        settle(targets)
        for t in tools:
            target = os.path.join(args.restore_into or work, f"restore-{t.name}")
            lean(t)
            best(results[t.name], "one small file restore", t.restore_one(target, data, one))
            if not os.path.isfile(os.path.join(target, one)) and not os.path.isfile(target + os.path.join(data, one)):
                raise SystemExit(f"{t.name} did not restore {one}")
            shutil.rmtree(target, ignore_errors=True)
        for t in tools:
            lean(t)
            best(results[t.name], "check --read-data", t.check())
    if args.cold:
        cold = os.path.join(work, "cold")
        os.makedirs(cold)
        for t in tools:
            twin = t.twin(cold)
            twin.init()
            results[t.name]["initial backup, cold cache"] = twin.backup(data, cold=True)
            shutil.rmtree(twin.repo)
        for t, target in zip(tools, targets):
            results[t.name]["full restore, cold cache"] = t.restore(target, cold=True)
        settle(targets)
    print(f"changed {changed} files for each 1% backup" + ("; restores and checks with a lean page cache"
                                                          if args.lean_cache else ""))
    limits = kernel_limits(data)
    names = [t.name for t in tools]
    ops = list(results[names[0]])
    # A ratio to restic for every other tool (e.g. chunkvault with a password and with a key secret).
    ratios = [n for n in names if n != "restic"] if "restic" in names else []
    width = {n: max(14, len(n) + 2) for n in names}
    rwidth = {n: max(14, len(n) + 11) for n in ratios}

    def header(last: str) -> str:
        return (f"{'operation':32}" + "".join(f"{n:>{width[n]}}" for n in names)
                + "".join(f"{n + ' / restic':>{rwidth[n]}}" for n in ratios) + last)

    def row(op: str, label: str, field: int, scale: float, digits: int, least: float) -> str:
        return (f"{label:32}" + "".join(f"{results[n][op][field] / scale:>{width[n]}.{digits}f}" for n in names)
                + "".join(f"{results[n][op][field] / max(results['restic'][op][field], least):>{rwidth[n]}.2f}"
                          for n in ratios))

    print(header(f"{'kernel limit':>14}"))
    for op in ops:
        unit = "MiB" if op == "repository size" else "s"
        print(row(op, f"{op} ({unit})", 0, 1, 2, 1e-9) + (f"{limits[op]:>14.2f}" if op in limits else ""))
    print("\npeak memory (MiB; RSS, or the summed PSS of a command's concurrent processes)")
    print(header(""))
    for op in ops:
        if op != "repository size":
            print(row(op, op, 1, 1024, 0, 1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
