"""Crash-consistency harness: run the real CLI, SIGKILL it at random moments, verify everything.

Used by tests/test_crash.py (short runs) and bench/reliability.py (long runs).
Each series returns a ``Figures`` record so callers can print what was proven.
Randomness comes from one seeded ``random.Random``: a failing run is replayed
with the same seed (kill delays depend on timing, so a replay is close, not exact).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from chunkvault import Repository
from chunkvault.store.repository import Repo
from chunkvault.store.snapshot import Snapshot
from treeutil import describe

PASSWORD = "crash harness password 7f3a"
CHUNKER = {"min_size": 16 << 10, "avg_size": 64 << 10, "max_size": 512 << 10}
PACK_SIZE = "64k"
State = dict  # describe() of a tree


# --- running the CLI ----------------------------------------------------------------


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    env.update(extra or {})
    return env


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "chunkvault.cli", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, ok: Iterable[int] = (0,)) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli_argv(*args), env=env or cli_env(), capture_output=True, timeout=300)
    if proc.returncode not in tuple(ok):
        raise AssertionError(f"chunkvault {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode().strip()}")
    return proc


@dataclass
class KillResult:
    killed: bool  # False: the command finished before the kill was due
    delay: float
    returncode: int
    elapsed: float
    stdout: bytes


def run_and_kill(argv: list[str], delay: float, env: dict[str, str]) -> KillResult:
    """Start ``argv``; SIGKILL it after ``delay`` seconds unless it finished first."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=delay)
        return KillResult(False, delay, proc.returncode, time.monotonic() - start, out)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        return KillResult(True, delay, proc.returncode, time.monotonic() - start, out)


def timed_cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = run_cli(*args, env=env)
    return proc, time.monotonic() - start


class KillClock:
    """Seeded kill delays spanning a command's run: a quarter uniform over the whole
    run (start-up included), the rest over the part after start-up, where it writes."""

    def __init__(self, rng: random.Random, startup: float, duration: float):
        self.rng = rng
        self.startup = startup
        self.duration = max(duration, startup * 1.2)

    def observe(self, elapsed: float) -> None:
        """A complete run of the same command took ``elapsed``: follow the workload's growth."""
        self.duration = max(elapsed, 0.85 * self.duration, self.startup * 1.2)

    def next(self) -> float:
        if self.rng.random() < 0.25:
            return self.rng.uniform(0.0, self.duration * 1.05)
        return self.rng.uniform(self.startup * 0.9, self.duration * 1.05)


def measure_startup() -> float:
    """Seconds until the CLI has imported everything and parsed its arguments."""
    start = time.monotonic()
    subprocess.run(cli_argv("--version"), capture_output=True, check=True, env=cli_env())
    return time.monotonic() - start


# --- source trees -------------------------------------------------------------------


class SourceTree:
    """A directory of a few MB that changes a little between backups (seeded)."""

    def __init__(self, root: str, rng: random.Random, target_bytes: int = 3 << 20):
        self.root = root
        self.rng = rng
        self.target = target_bytes
        self.counter = 0
        os.makedirs(root, exist_ok=True)
        for sub in ("a", "a/deep", "b"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        while self.size() < target_bytes:
            self._new_file()

    def files(self) -> list[str]:
        out = []
        for dirpath, _, names in os.walk(self.root):
            out.extend(os.path.join(dirpath, n) for n in names)
        return sorted(out)

    def size(self) -> int:
        return sum(os.path.getsize(f) for f in self.files())

    def _content(self, n: int) -> bytes:
        if self.rng.random() < 0.3:  # compressible text
            words = [b"chunkvault", b"page", b"row", b"index", b"commit", b"vacuum", b"\n"]
            out = bytearray()
            while len(out) < n:
                out += self.rng.choice(words) + b" "
            return bytes(out[:n])
        return self.rng.randbytes(n)

    def _new_file(self) -> None:
        self.counter += 1
        d = self.rng.choice(["", "a", "a/deep", "b"])
        size = self.rng.choice([0, 100, 5000, self.rng.randrange(20_000, 400_000)])
        with open(os.path.join(self.root, d, f"f{self.counter:04d}.bin"), "wb") as f:
            f.write(self._content(size))

    def mutate(self) -> None:
        """Rewrite, patch, append, add and delete a few files (about a fifth of the bytes change)."""
        files = self.files()
        rng = self.rng
        for path in rng.sample(files, min(len(files), 2)):  # patch ranges in place
            size = os.path.getsize(path)
            if size:
                with open(path, "r+b") as f:
                    for _ in range(rng.randrange(1, 4)):
                        f.seek(rng.randrange(size))
                        f.write(rng.randbytes(rng.randrange(1, 3000)))
        for path in rng.sample(files, min(len(files), 1)):  # append
            with open(path, "ab") as f:
                f.write(self._content(rng.randrange(1, 50_000)))
        for path in rng.sample(files, min(len(files), 2)):  # rewrite whole
            with open(path, "wb") as f:
                f.write(self._content(rng.randrange(0, 300_000)))
        for _ in range(rng.randrange(1, 3)):
            self._new_file()
        files = self.files()
        while len(files) > 4 and (self.size() > self.target * 1.3 or rng.random() < 0.4):
            os.remove(files.pop(rng.randrange(len(files))))
            if rng.random() < 0.6:
                break

    def state(self) -> State:
        return describe(self.root)


# --- looking inside a repository --------------------------------------------------------


def open_repo(path: str, password: str = PASSWORD) -> Repository:
    return Repository.open(path, password)


def init_repo(path: str, *, copy_from: str | None = None) -> None:
    """A repository with small packs and chunks, so a few MB make many objects."""
    args = ["init", "-r", path, "--pack-size", PACK_SIZE, "--kdf-time", "0", "--chunk-avg", "64k", "-q"]
    env = None
    if copy_from is not None:
        args += ["--copy-chunker-params-from", copy_from]
        env = cli_env({"CHUNKVAULT_FROM_PASSWORD": PASSWORD})
    run_cli(*args, env=env)


def object_listing(path: str) -> dict[str, int]:
    """Every finished object of a local repository (key -> size), temp files excluded."""
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            if not n.startswith(".tmp-"):
                full = os.path.join(dirpath, n)
                out[os.path.relpath(full, path)] = os.path.getsize(full)
    return out


def temp_leftovers(path: str) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names if n.startswith(".tmp-"))


def snapshot_ids(path: str) -> set[str]:
    d = os.path.join(path, "snapshots")
    return {n for n in os.listdir(d) if not n.startswith(".tmp-")} if os.path.isdir(d) else set()


def indexed_blobs(repo: Repo) -> dict[bytes, list[tuple[bytes, int]]]:
    """Blob id -> [(pack id, raw length)] over the live (not superseded) index objects."""
    datas = {name: repo.read_index_object(name) for name in repo.index_names()}
    superseded = {s.hex() for d in datas.values() for s in d.supersedes}
    out: dict[bytes, list[tuple[bytes, int]]] = {}
    for name, d in datas.items():
        if name in superseded:
            continue
        for pid, entries in d.packs.items():
            for e in entries:
                if pid not in [p for p, _ in out.get(e.blob_id, [])]:
                    out.setdefault(e.blob_id, []).append((pid, e.raw_length))
    return out


def duplicates(index: dict[bytes, list[tuple[bytes, int]]]) -> int:
    """Blobs stored in more than one indexed pack (data sent twice)."""
    return sum(1 for locs in index.values() if len(locs) > 1)


def tree_blobs(repo: Repo, snap: Snapshot) -> set[bytes]:
    """Every blob a snapshot needs: its manifest pieces and the chunks of its resolved tree."""
    out = {bytes.fromhex(h) for h in snap.manifest}
    for rec in repo.tree(snap):
        if rec.entry is not None and rec.entry.chunks:
            out.update(rec.entry.chunk_ids())
    return out


# --- verification -----------------------------------------------------------------------


@dataclass
class Figures:
    """What a series proved; printed by the benchmark, asserted by the tests."""

    name: str
    runs: int = 0
    kills: int = 0  # runs SIGKILLed before they finished
    effective_kills: int = 0  # kills after which the repository held objects the run had written
    finished_before_kill: int = 0
    snapshots_verified: int = 0  # restores compared byte for byte
    checks: int = 0
    check_warnings: int = 0
    temp_leftovers: int = 0
    reused_bytes: int = 0  # data a killed run stored that the next run did not send again
    recoveries: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.name}: {self.kills} kills survived ({self.effective_kills} mid-write, "
                f"{self.finished_before_kill} runs finished first), {self.recoveries} recoveries, "
                f"{self.snapshots_verified} restores verified byte for byte, {self.checks} checks clean "
                f"({self.check_warnings} warnings), {self.temp_leftovers} temp files left by kills, "
                f"{self.reused_bytes} bytes reused after kills, {self.seconds:.1f} s")


def check_clean(path: str, figures: Figures, *, read_data: bool = False) -> None:
    with open_repo(path) as repo:
        report = repo.check(read_data=read_data)
    figures.checks += 1
    figures.check_warnings += len(report.warnings)
    if not report.ok:
        raise AssertionError(f"check found problems in {path}: {[p.to_dict() for p in report.problems]}")


def verify_restores(path: str, expected: dict[str, State], scratch: str, figures: Figures,
                    only: Iterable[str] | None = None) -> None:
    """Restore each snapshot (all of ``expected``, or ``only``) and compare with its recorded tree."""
    with open_repo(path) as repo:
        present = {s.id for s in repo.snapshots()}
        for sid in (list(only) if only is not None else list(expected)):
            if sid not in present:
                raise AssertionError(f"snapshot {sid} that was reported written is gone")
            out = os.path.join(scratch, f"restore-{sid[:12]}")
            try:
                repo.restore(sid, out)
                got = describe(out)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            if got != expected[sid]:
                diff = sorted(k for k in set(got) | set(expected[sid]) if got.get(k) != expected[sid].get(k))
                raise AssertionError(f"snapshot {sid[:12]} restored differently: {diff[:10]}")
            figures.snapshots_verified += 1


def _to_verify(rng: random.Random, expected: dict[str, State], newest: Iterable[str], full: bool) -> list[str]:
    if full:
        return list(expected)
    ids = list(expected)
    pick = set(newest) | set(rng.sample(ids, min(3, len(ids))))
    return [i for i in ids if i in pick]


def _log(log: Callable[[str], None] | None, text: str) -> None:
    if log is not None:
        log(text)


# --- the series -----------------------------------------------------------------------------


def crash_backup_series(workdir: str, n: int, seed: int, *, full_verify_every: int = 1,
                        log: Callable[[str], None] | None = None) -> Figures:
    """``n`` times: change the tree, start a backup, SIGKILL it; check, restore every earlier
    snapshot, run the backup to the end and prove it reused what the killed run had stored."""
    started = time.monotonic()
    fig = Figures("backup")
    rng = random.Random(seed)
    repo_path, src, scratch = (os.path.join(workdir, d) for d in ("repo", "src", "scratch"))
    os.makedirs(scratch, exist_ok=True)
    init_repo(repo_path)
    tree = SourceTree(src, rng)
    env = cli_env()
    expected: dict[str, State] = {}
    proc, elapsed = timed_cli("backup", "-r", repo_path, src, "--json", env=env)
    expected[json.loads(proc.stdout)["id"]] = tree.state()
    clock = KillClock(rng, measure_startup(), elapsed)
    for i in range(n):
        tree.mutate()
        state = tree.state()
        with open_repo(repo_path) as repo:
            index_before = indexed_blobs(repo.store)
        objects_before = object_listing(repo_path)
        snaps_before = snapshot_ids(repo_path)
        kr = run_and_kill(cli_argv("backup", "-r", repo_path, src, "--json", "-q"), clock.next(), env)
        fig.runs += 1
        fig.kills += kr.killed
        fig.finished_before_kill += not kr.killed
        if not kr.killed and kr.returncode != 0:
            raise AssertionError(f"backup run {i} failed with exit {kr.returncode}")
        new_objects = set(object_listing(repo_path)) - set(objects_before) - {
            k for k in object_listing(repo_path) if k.startswith("locks/")}
        fig.effective_kills += kr.killed and bool(new_objects)
        fig.temp_leftovers += len(temp_leftovers(repo_path))
        for sid in snapshot_ids(repo_path) - snaps_before:  # it finished, or died just after saving
            expected[sid] = state
        check_clean(repo_path, fig)
        full = (i + 1) % full_verify_every == 0 or i == n - 1
        verify_restores(repo_path, expected, scratch, fig,
                        only=_to_verify(rng, expected, snapshot_ids(repo_path) - snaps_before, full))
        with open_repo(repo_path) as repo:
            index_after_kill = indexed_blobs(repo.store)
        proc, elapsed = timed_cli("backup", "-r", repo_path, src, "--json", env=env)
        clock.observe(elapsed)
        out = json.loads(proc.stdout)
        expected[out["id"]] = state
        fig.recoveries += 1
        with open_repo(repo_path) as repo:
            snap = repo.snapshot(out["id"])
            needed = tree_blobs(repo.store, snap)
            index_now = indexed_blobs(repo.store)
        raw = {b: locs[0][1] for b, locs in index_now.items()}
        must_store = sum(raw[b] for b in needed if b not in index_after_kill)
        reused = sum(raw[b] for b in needed if b in index_after_kill and b not in index_before)
        if out["stats"]["added_raw_bytes"] != must_store:
            raise AssertionError(f"run {i}: the backup after the kill stored {out['stats']['added_raw_bytes']} raw "
                                 f"bytes; exactly {must_store} were missing from the index")
        if duplicates(index_now):
            raise AssertionError(f"run {i}: {duplicates(index_now)} blob(s) stored twice")
        fig.reused_bytes += reused
        verify_restores(repo_path, expected, scratch, fig, only=[out["id"]])
        _log(log, f"backup {i + 1}/{n}: {'killed' if kr.killed else 'finished'} at {kr.delay:.3f} s, "
                  f"{len(new_objects)} new objects, reused {reused} B")
    check_clean(repo_path, fig, read_data=True)
    verify_restores(repo_path, expected, scratch, fig)
    fig.seconds = time.monotonic() - started
    return fig


def crash_prune_series(workdir: str, n: int, seed: int, *, keep: int = 3, full_verify_every: int = 1,
                       log: Callable[[str], None] | None = None) -> Figures:
    """``n`` times: back up a changed tree, forget the oldest snapshots, start `prune`, SIGKILL it;
    check, restore every kept snapshot, then let prune finish and prove it left nothing unused."""
    started = time.monotonic()
    fig = Figures("prune")
    rng = random.Random(seed)
    repo_path, src, scratch = (os.path.join(workdir, d) for d in ("repo", "src", "scratch"))
    os.makedirs(scratch, exist_ok=True)
    init_repo(repo_path)
    tree = SourceTree(src, rng)
    env = cli_env()
    expected: dict[str, State] = {}
    with open_repo(repo_path) as repo:
        for _ in range(keep):
            expected[repo.backup([src]).snapshot.id] = tree.state()
            tree.mutate()
    proc, elapsed = timed_cli("prune", "-r", repo_path, "--max-unused", "0", env=env)
    clock = KillClock(rng, measure_startup(), elapsed)
    for i in range(n):
        with open_repo(repo_path) as repo:
            expected[repo.backup([src]).snapshot.id] = tree.state()
            tree.mutate()
            expected[repo.backup([src]).snapshot.id] = tree.state()
            tree.mutate()
            order = [s.id for s in repo.snapshots()]
            gone = order[: max(0, len(order) - keep)]
            repo.forget(gone)
        for sid in gone:
            expected.pop(sid, None)
        objects_before = object_listing(repo_path)
        kr = run_and_kill(cli_argv("prune", "-r", repo_path, "--max-unused", "0", "-q"), clock.next(), env)
        fig.runs += 1
        fig.kills += kr.killed
        fig.finished_before_kill += not kr.killed
        if not kr.killed and kr.returncode != 0:
            raise AssertionError(f"prune run {i} failed with exit {kr.returncode}")
        after = object_listing(repo_path)
        changed = {k for k in set(after) ^ set(objects_before) if not k.startswith("locks/")}
        fig.effective_kills += kr.killed and bool(changed)
        fig.temp_leftovers += len(temp_leftovers(repo_path))
        check_clean(repo_path, fig)
        full = (i + 1) % full_verify_every == 0 or i == n - 1
        verify_restores(repo_path, expected, scratch, fig, only=_to_verify(rng, expected, [], full))
        proc, elapsed = timed_cli("prune", "-r", repo_path, "--max-unused", "0", "--json", env=env)
        clock.observe(elapsed)
        fig.recoveries += 1
        with open_repo(repo_path) as repo:
            rest = repo.prune(dry_run=True, max_unused=0)
            report = repo.check()
        if rest.delete or rest.repack or rest.orphans or rest.unused_blobs:
            raise AssertionError(f"run {i}: the prune after the kill left work undone: {rest.to_dict()}")
        if report.warnings or not report.ok:
            raise AssertionError(f"run {i}: after a finished prune: {report.to_dict()}")
        _log(log, f"prune {i + 1}/{n}: {'killed' if kr.killed else 'finished'} at {kr.delay:.3f} s, "
                  f"{len(changed)} objects changed before the kill")
    check_clean(repo_path, fig, read_data=True)
    verify_restores(repo_path, expected, scratch, fig)
    fig.seconds = time.monotonic() - started
    return fig


def crash_copy_series(workdir: str, n: int, seed: int, *, full_verify_every: int = 1,
                      log: Callable[[str], None] | None = None) -> Figures:
    """``n`` times: back up a changed tree into the source, start `copy` to a second repository,
    SIGKILL it; check the destination, restore every copied snapshot there, let copy finish and
    prove each snapshot arrived exactly once and no indexed blob was sent twice."""
    started = time.monotonic()
    fig = Figures("copy")
    rng = random.Random(seed)
    src_repo, dst_repo, src, scratch = (os.path.join(workdir, d) for d in ("src-repo", "dst-repo", "src", "scratch"))
    os.makedirs(scratch, exist_ok=True)
    init_repo(src_repo)
    init_repo(dst_repo, copy_from=src_repo)
    tree = SourceTree(src, rng)
    env = cli_env({"CHUNKVAULT_TO_PASSWORD": PASSWORD})
    by_source: dict[str, State] = {}
    with open_repo(src_repo) as repo:
        by_source[repo.backup([src]).snapshot.id] = tree.state()
    proc, elapsed = timed_cli("copy", "-r", src_repo, "--to", dst_repo, env=env)
    clock = KillClock(rng, measure_startup(), elapsed)
    for i in range(n):
        with open_repo(src_repo) as repo:
            for _ in range(rng.randrange(1, 3)):
                tree.mutate()
                by_source[repo.backup([src]).snapshot.id] = tree.state()
        objects_before = object_listing(dst_repo)
        with open_repo(dst_repo) as repo:
            index_before = indexed_blobs(repo.store)
        kr = run_and_kill(cli_argv("copy", "-r", src_repo, "--to", dst_repo, "-q"), clock.next(), env)
        fig.runs += 1
        fig.kills += kr.killed
        fig.finished_before_kill += not kr.killed
        if not kr.killed and kr.returncode != 0:
            raise AssertionError(f"copy run {i} failed with exit {kr.returncode}")
        changed = {k for k in set(object_listing(dst_repo)) - set(objects_before) if not k.startswith("locks/")}
        fig.effective_kills += kr.killed and bool(changed)
        fig.temp_leftovers += len(temp_leftovers(dst_repo))
        check_clean(dst_repo, fig)
        expected = _copied_states(dst_repo, by_source)
        full = (i + 1) % full_verify_every == 0 or i == n - 1
        verify_restores(dst_repo, expected, scratch, fig, only=_to_verify(rng, expected, [], full))
        with open_repo(dst_repo) as repo:
            index_after_kill = indexed_blobs(repo.store)
        proc, elapsed = timed_cli("copy", "-r", src_repo, "--to", dst_repo, "--json", env=env)
        clock.observe(elapsed)
        fig.recoveries += 1
        expected = _copied_states(dst_repo, by_source)
        if len(expected) != len(by_source):
            raise AssertionError(f"run {i}: {len(by_source)} source snapshots, {len(expected)} copied")
        with open_repo(dst_repo) as repo:
            index_now = indexed_blobs(repo.store)
        if duplicates(index_now):
            raise AssertionError(f"run {i}: {duplicates(index_now)} blob(s) sent twice to the destination")
        fig.reused_bytes += sum(locs[0][1] for b, locs in index_after_kill.items() if b not in index_before)
        _log(log, f"copy {i + 1}/{n}: {'killed' if kr.killed else 'finished'} at {kr.delay:.3f} s, "
                  f"{len(changed)} new objects before the kill")
    check_clean(dst_repo, fig, read_data=True)
    verify_restores(dst_repo, _copied_states(dst_repo, by_source), scratch, fig)
    fig.seconds = time.monotonic() - started
    return fig


def _copied_states(dst_repo: str, by_source: dict[str, State]) -> dict[str, State]:
    """Destination snapshot id -> the tree of the source snapshot it copies; each source at most once."""
    out: dict[str, State] = {}
    seen: set[str] = set()
    with open_repo(dst_repo) as repo:
        for s in repo.snapshots():
            origin = s.stats.get("copied_from")
            if origin in seen:
                raise AssertionError(f"source snapshot {origin} was copied twice")
            if origin not in by_source:
                raise AssertionError(f"destination snapshot {s.id} copies an unknown snapshot {origin}")
            seen.add(origin)
            out[s.id] = by_source[origin]
    return out
