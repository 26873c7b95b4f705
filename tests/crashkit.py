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
import statistics
import subprocess
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from chunkvault import Repository
from chunkvault.store.repository import Repo
from chunkvault.store.snapshot import Snapshot
from treeutil import describe

PASSWORD = "crash harness password 7f3a"
PACK_SIZE = "64k"
COMPRESSION = 19
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


def run_and_kill(argv: list[str], delay: float, env: dict[str, str], *, watch: str | None = None,
                 after_changes: int | None = None, rewrites: bool = False) -> KillResult:
    """Start ``argv``; SIGKILL it after ``delay`` seconds unless it finished first.

    With ``watch`` and ``after_changes`` the kill comes instead as soon as that many
    objects of the repository at ``watch`` were added or removed (locks and temp files
    aside): a kill that surely lands between two of the command's writes.  With
    ``rewrites`` an object written again under its name (a tag, a rebase) counts too.
    """
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if watch is None or after_changes is None:
        try:
            out, _ = proc.communicate(timeout=delay)
            return KillResult(False, delay, proc.returncode, time.monotonic() - start, out)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate()
            return KillResult(True, delay, proc.returncode, time.monotonic() - start, out)
    listing = object_versions if rewrites else object_listing
    base = {k for k in listing(watch).items() if not k[0].startswith("locks/")}
    while proc.poll() is None:
        now = {k for k in listing(watch).items() if not k[0].startswith("locks/")}
        if len(now ^ base) >= after_changes:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    out, _ = proc.communicate()
    killed = proc.returncode == -signal.SIGKILL
    return KillResult(killed, time.monotonic() - start, proc.returncode, time.monotonic() - start, out)


def timed_cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = run_cli(*args, env=env)
    return proc, time.monotonic() - start


class KillClock:
    """Seeded kill moments drawn from what complete runs of the same command took, so that
    nearly every run is killed: a delay uniform below 0.95 of a recent run's duration (a
    quarter of them from the start, the rest past start-up, where it writes), or, every
    other run, a number of its writes uniform below 0.95 of a recent run's count.

    Recent means the median of the last few complete runs: the runs after a kill finish
    what the killed one left, so they are shorter, and a kill drawn from them lands."""

    RECENT = 3

    def __init__(self, rng: random.Random, startup: float, duration: float):
        self.rng = rng
        self.startup = startup
        self.durations: deque[float] = deque([duration], maxlen=self.RECENT)
        self.changes: deque[int] = deque(maxlen=self.RECENT)  # objects a complete run added or removed

    def observe(self, elapsed: float) -> None:
        """A complete run of the same command took ``elapsed`` seconds."""
        self.durations.append(elapsed)

    def observe_changes(self, n: int) -> None:
        if n > 0:
            self.changes.append(n)

    @property
    def duration(self) -> float:
        return statistics.median(self.durations)

    def pick_changes(self) -> int | None:
        """Every other run is killed after a random number of its writes instead of a delay."""
        if self.rng.random() < 0.5:
            return None
        recent = statistics.median(self.changes) if self.changes else 1
        return self.rng.randint(1, max(1, int(0.95 * recent)))

    def next(self) -> float:
        end = 0.95 * self.duration
        start = self.startup * 0.9
        if self.rng.random() < 0.25 or start >= end:
            return self.rng.uniform(0.0, end)
        return self.rng.uniform(start, end)


def measure_startup(repo_path: str) -> float:
    """Seconds until the CLI has imported everything and opened the repository (the
    shortest of three runs of `snapshots`): before that a kill cannot hit a write."""
    best = float("inf")
    for _ in range(3):
        start = time.monotonic()
        run_cli("snapshots", "-r", repo_path, "-q")
        best = min(best, time.monotonic() - start)
    return best


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


def open_repo(path: str, password: str = PASSWORD, *, ledger: bool | str = True) -> Repository:
    return Repository.open(path, password, ledger=ledger)


def init_repo(path: str, *, copy_from: str | None = None, compression: int = COMPRESSION) -> None:
    """A repository with small packs and chunks, so a few MB make many objects; a slow zstd
    level widens the window in which a kill lands while data is being written."""
    args = ["init", "-r", path, "--pack-size", PACK_SIZE, "--kdf-time", "0", "-q", "--compression", str(compression)]
    env = None
    if copy_from is None:
        args += ["--chunk-avg", "64k"]
    else:  # the chunker of that repository
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
                try:
                    out[os.path.relpath(full, path)] = os.path.getsize(full)
                except FileNotFoundError:  # removed while we looked (a lock, a pruned pack)
                    continue
    return out


def object_versions(path: str) -> dict[str, tuple[int, int]]:
    """Every finished object of a local repository (key -> (size, mtime_ns)): one written again
    under its own name shows as changed."""
    out = {}
    for key in object_listing(path):
        try:
            st = os.stat(os.path.join(path, key))
        except FileNotFoundError:
            continue
        out[key] = (st.st_size, st.st_mtime_ns)
    return out


def temp_leftovers(path: str) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names if n.startswith(".tmp-"))


def put_snapshot_back(path: str, sid: str, raw: dict[str, bytes]) -> None:
    """Write a snapshot object's saved bytes back under its own name (a replay)."""
    with open(os.path.join(path, "snapshots", sid), "wb") as f:
        f.write(raw[sid])


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
    runs: int = 0  # runs started with a kill moment
    kills: int = 0  # runs SIGKILLed before they finished
    effective_kills: int = 0  # kills after which the repository held objects the run had written
    finished_before_kill: int = 0
    snapshots_verified: int = 0  # restores compared byte for byte
    checks: int = 0
    check_warnings: int = 0
    temp_leftovers: int = 0
    late_kills: int = 0  # kills after the run had written an index object (its data is reusable)
    reused_bytes: int = 0  # data a killed run stored that the next run did not send again
    recoveries: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.name}: {self.runs} runs, {self.kills} killed and survived ({self.effective_kills} mid-write, "
                f"{self.late_kills} after an index write), {self.finished_before_kill} finished before their "
                f"kill moment; {self.recoveries} recoveries, "
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
    clock = KillClock(rng, measure_startup(repo_path), elapsed)
    for i in range(n):
        tree.mutate()
        state = tree.state()
        with open_repo(repo_path) as repo:
            index_before = indexed_blobs(repo.store)
        objects_before = object_listing(repo_path)
        snaps_before = snapshot_ids(repo_path)
        kr = run_and_kill(cli_argv("backup", "-r", repo_path, src, "--json", "-q"), clock.next(), env,
                          watch=repo_path, after_changes=clock.pick_changes())
        fig.runs += 1
        fig.kills += kr.killed
        fig.finished_before_kill += not kr.killed
        if not kr.killed:
            clock.observe(kr.elapsed)
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
        fig.late_kills += kr.killed and bool(set(index_after_kill) - set(index_before))
        listed = set(object_listing(repo_path))
        proc, elapsed = timed_cli("backup", "-r", repo_path, src, "--json", env=env)
        clock.observe(elapsed)
        clock.observe_changes(len(set(object_listing(repo_path)) - listed))
        out = json.loads(proc.stdout)
        expected[out["id"]] = state
        fig.recoveries += 1
        with open_repo(repo_path) as repo:
            snap = repo.snapshot(out["id"])
            needed = tree_blobs(repo.store, snap)
            index_now = indexed_blobs(repo.store)
        raw = {b: locs[0][1] for b, locs in index_now.items()}
        own = {bytes.fromhex(h) for h in snap.manifest}  # the snapshot's manifest: not counted as added data
        must_store = sum(raw[b] for b in needed - own if b not in index_after_kill)
        reused = sum(raw[b] for b in needed if b in index_after_kill and b not in index_before)
        if out["stats"]["added_raw_bytes"] != must_store:
            raise AssertionError(f"run {i}: the backup after the kill stored {out['stats']['added_raw_bytes']} raw "
                                 f"bytes; exactly {must_store} were missing from the index")
        if duplicates(index_now):
            raise AssertionError(f"run {i}: {duplicates(index_now)} blob(s) stored twice")
        if kr.killed:
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
    clock = KillClock(rng, measure_startup(repo_path), elapsed)
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
        kr = run_and_kill(cli_argv("prune", "-r", repo_path, "--max-unused", "0", "-q"), clock.next(), env,
                          watch=repo_path, after_changes=clock.pick_changes())
        fig.runs += 1
        fig.kills += kr.killed
        fig.finished_before_kill += not kr.killed
        if not kr.killed:
            clock.observe(kr.elapsed)
        if not kr.killed and kr.returncode != 0:
            raise AssertionError(f"prune run {i} failed with exit {kr.returncode}")
        after = object_listing(repo_path)
        changed = {k for k in set(after) ^ set(objects_before) if not k.startswith("locks/")}
        fig.effective_kills += kr.killed and bool(changed)
        if not kr.killed:
            clock.observe_changes(len(changed))
        fig.temp_leftovers += len(temp_leftovers(repo_path))
        check_clean(repo_path, fig)
        full = (i + 1) % full_verify_every == 0 or i == n - 1
        verify_restores(repo_path, expected, scratch, fig, only=_to_verify(rng, expected, [], full))
        listed = set(object_listing(repo_path))
        proc, elapsed = timed_cli("prune", "-r", repo_path, "--max-unused", "0", "--json", env=env)
        clock.observe(elapsed)
        clock.observe_changes(len(set(object_listing(repo_path)) ^ listed))
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
    clock = KillClock(rng, measure_startup(src_repo), elapsed)
    for i in range(n):
        with open_repo(src_repo) as repo:
            for _ in range(rng.randrange(1, 3)):
                tree.mutate()
                by_source[repo.backup([src]).snapshot.id] = tree.state()
        objects_before = object_listing(dst_repo)
        with open_repo(dst_repo) as repo:
            index_before = indexed_blobs(repo.store)
        kr = run_and_kill(cli_argv("copy", "-r", src_repo, "--to", dst_repo, "-q"), clock.next(), env,
                          watch=dst_repo, after_changes=clock.pick_changes())
        fig.runs += 1
        fig.kills += kr.killed
        fig.finished_before_kill += not kr.killed
        if not kr.killed:
            clock.observe(kr.elapsed)
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
        fig.late_kills += kr.killed and bool(set(index_after_kill) - set(index_before))
        listed = set(object_listing(dst_repo))
        proc, elapsed = timed_cli("copy", "-r", src_repo, "--to", dst_repo, "--json", env=env)
        clock.observe(elapsed)
        clock.observe_changes(len(set(object_listing(dst_repo)) - listed))
        fig.recoveries += 1
        expected = _copied_states(dst_repo, by_source)
        if len(expected) != len(by_source):
            raise AssertionError(f"run {i}: {len(by_source)} source snapshots, {len(expected)} copied")
        with open_repo(dst_repo) as repo:
            index_now = indexed_blobs(repo.store)
        if duplicates(index_now):
            raise AssertionError(f"run {i}: {duplicates(index_now)} blob(s) sent twice to the destination")
        if kr.killed:
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


# --- tampering ------------------------------------------------------------------------------

OBJECT_KINDS = ("config", "key", "pack-data", "pack-header", "index", "snapshot")
# Changes to the set of snapshots rather than to an object: a forgotten snapshot put back, the
# newest deleted.  Only the client that made the repository (its ledger) can tell.
SET_KINDS = ("snapshot-set",)


def ledger_of(pristine: str) -> str:
    """The ledger directory of the client that built ``pristine`` (copied along with it)."""
    return pristine + "-ledger"


def _forgotten_of(pristine: str) -> str:
    return pristine + "-forgotten"


@dataclass
class Tampered:
    """One damaged object and how the repository reacted to it."""

    kind: str
    key: str
    how: str
    outcome: str = ""  # detected | misreported | harmless
    messages: list[str] = field(default_factory=list)


@dataclass
class TamperFigures:
    made: int = 0
    detected: int = 0  # an error or check problem naming the damaged object
    misreported: int = 0  # detected, but under another name (e.g. "wrong password")
    harmless: int = 0  # not detected, and every restore still exact (unauthenticated cosmetic bytes)
    wrong_data: int = 0  # must stay 0: a restore that produced other bytes without an error
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [made, detected, misreported, harmless]

    def add(self, t: Tampered) -> None:
        self.made += 1
        row = self.by_kind.setdefault(t.kind, [0, 0, 0, 0])
        row[0] += 1
        i = {"detected": 1, "misreported": 2, "harmless": 3}[t.outcome]
        row[i] += 1
        setattr(self, t.outcome, getattr(self, t.outcome) + 1)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {r[1]}+{r[2]}/{r[0]}" for k, r in sorted(self.by_kind.items()))
        return (f"tampering: {self.detected + self.misreported} of {self.made} corruptions detected "
                f"({self.misreported} under another name), {self.harmless} harmless (restores exact), "
                f"{self.wrong_data} wrong restores; per kind detected/made: {kinds}")


def build_tamper_repo(workdir: str) -> tuple[str, dict[str, State]]:
    """A small repository with every object type: a full and two differentials (one rebased
    by a forget), a compacted index plus a newer one, packs with many blobs.  The client that
    builds it keeps its ledger beside it, and the forgotten snapshot's bytes."""
    path = os.path.join(workdir, "pristine")
    src = os.path.join(workdir, "src")
    init_repo(path, compression=3)
    tree = SourceTree(src, random.Random(77), target_bytes=1 << 20)
    states: dict[str, State] = {}
    with open_repo(path, ledger=ledger_of(path)) as repo:
        for _ in range(3):
            states[repo.backup([src], kind="auto").snapshot.id] = tree.state()
            tree.mutate()
        middle = list(states)[1]
        os.makedirs(_forgotten_of(path))
        shutil.copy(os.path.join(path, "snapshots", middle), _forgotten_of(path))
        repo.forget([middle])  # the third is rebased onto the first
        states.pop(middle)
        repo.prune(max_unused=0)
        states[repo.backup([src]).snapshot.id] = tree.state()
    return path, states


def object_keys(path: str, kind: str) -> list[str]:
    keys = sorted(object_listing(path))
    prefix = {"config": "config", "key": "keys/", "pack-data": "data/", "pack-header": "data/",
              "index": "index/", "snapshot": "snapshots/"}[kind]
    return [k for k in keys if k.startswith(prefix)]


Damage = Callable[[bytes], "bytes | None"]  # an object's bytes (b"" if absent) -> new bytes, or None: delete


def mutations(path: str, kind: str, rng: random.Random, flips: int) -> Iterable[tuple[str, str, Damage]]:
    """(object key, description, damage) for one object kind (or kind of change to the snapshot set)."""
    if kind == "snapshot-set":
        yield from _set_mutations(path)
        return
    keys = object_keys(path, kind)
    sizes = {k: os.path.getsize(os.path.join(path, k)) for k in keys}

    def flip(pos: int, bit: int) -> Callable[[bytes], bytes]:
        def f(b: bytes) -> bytes:
            out = bytearray(b)
            out[pos % len(out)] ^= 1 << bit
            return bytes(out)
        return f

    def tail_region(key: str) -> tuple[int, int]:
        """(start, end) of a pack's sealed header and trailer."""
        with open(os.path.join(path, key), "rb") as f:
            data = f.read()
        hlen = int.from_bytes(data[-8:-4], "little")
        return len(data) - 8 - hlen, len(data)

    for i in range(flips):
        key = keys[i % len(keys)]
        if kind == "pack-data":
            lo, hi = 0, tail_region(key)[0]
        elif kind == "pack-header":
            lo, hi = tail_region(key)
        else:
            lo, hi = 0, sizes[key]
        pos, bit = rng.randrange(lo, hi), rng.randrange(8)
        yield key, f"bit {bit} of byte {pos} flipped", flip(pos, bit)
    if kind == "pack-header":
        return
    key = keys[0]
    for cut in (0, sizes[key] // 2, sizes[key] - 1):
        yield key, f"truncated to {cut} bytes", (lambda n: lambda b: b[:n])(cut)
    others = [k for k in keys if k != key]
    if others:
        with open(os.path.join(path, others[-1]), "rb") as f:
            other = f.read()
        yield key, f"replaced by the bytes of {others[-1]}", lambda _b: other


def _set_mutations(path: str) -> Iterable[tuple[str, str, Damage]]:
    for name in sorted(os.listdir(_forgotten_of(path))):
        with open(os.path.join(_forgotten_of(path), name), "rb") as f:
            data = f.read()
        yield f"snapshots/{name}", "forgotten snapshot put back", lambda _b, d=data: d
    with open_repo(path, ledger=False) as repo:
        newest = repo.snapshots()[-1].id
    yield f"snapshots/{newest}", "newest snapshot deleted", lambda _b: None


def identifiers(path: str, key: str) -> set[str]:
    """Names an error about ``key`` may use: the key's last part, and for a pack its blob ids."""
    names = {key.rsplit("/", 1)[-1]}
    if key.startswith("data/"):
        from chunkvault.store.pack import read_pack

        with open_repo(path) as repo, open(os.path.join(path, key), "rb") as f:
            names |= {e.blob_id.hex() for e in read_pack(repo.store.sealer, f.read(), key)}
    return names


def probe(path: str, states: dict[str, State], scratch: str, *, ledger: bool | str = True) -> list[str]:
    """Open, check --read-data and restore every snapshot; the errors, problems and warnings seen.

    A restore that completes must equal its recorded tree: anything else raises
    AssertionError (wrong data), whatever the damage was.
    """
    from chunkvault.errors import ChunkvaultError

    seen: list[str] = []
    try:
        repo = open_repo(path, ledger=ledger)
    except ChunkvaultError as exc:
        return [f"{type(exc).__name__}: {exc}"]
    with repo, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            report = repo.check(read_data=True)
            seen += [f"check: {p.object}: {p.problem}" for p in report.problems]
        except ChunkvaultError as exc:
            seen.append(f"check raised {type(exc).__name__}: {exc}")
        for sid, state in states.items():
            out = os.path.join(scratch, f"probe-{sid[:12]}")
            try:
                repo.restore(sid, out)
                got = describe(out)
                if got != state:
                    raise AssertionError(f"WRONG DATA: snapshot {sid} restored differently, no error raised")
            except ChunkvaultError as exc:
                seen.append(f"restore {sid[:12]}: {type(exc).__name__}: {exc}")
            finally:
                shutil.rmtree(out, ignore_errors=True)
    from chunkvault.ledger import RepositoryStateWarning

    seen += sorted({f"warning: {w.message}" for w in warned if issubclass(w.category, RepositoryStateWarning)})
    return seen


def tamper_one(pristine: str, states: dict[str, State], workdir: str, kind: str, key: str, how: str,
               damage: Damage) -> Tampered:
    """Damage one object in a fresh copy of ``pristine`` (and of its client's ledger) and
    classify what happened."""
    work = os.path.join(workdir, "tampered")
    for d in (work, ledger_of(work)):
        shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(pristine, work)
    shutil.copytree(ledger_of(pristine), ledger_of(work))
    target = os.path.join(work, key)
    data = b""
    if os.path.exists(target):
        with open(target, "rb") as f:
            data = f.read()
    bad = damage(data)
    if bad is None:
        os.remove(target)
    else:
        with open(target, "wb") as f:
            f.write(bad)
    t = Tampered(kind, key, how)
    t.messages = probe(work, states, workdir, ledger=ledger_of(work))
    names = identifiers(pristine, key)
    if not t.messages:
        t.outcome = "harmless"
    elif any(n in m for m in t.messages for n in names) or (key == "config" and any(
            "UnsupportedFormat" in m or "config" in m for m in t.messages)):
        t.outcome = "detected"
    else:
        t.outcome = "misreported"
    for d in (work, ledger_of(work)):
        shutil.rmtree(d, ignore_errors=True)
    return t


def tamper_sweep(workdir: str, seed: int, flips: int = 8,
                 log: Callable[[str], None] | None = None) -> tuple[TamperFigures, list[Tampered]]:
    """Every object kind: ``flips`` bit flips, three truncations and a swap, each probed; and
    the snapshot set replayed and rolled back."""
    pristine, states = build_tamper_repo(workdir)
    rng = random.Random(seed)
    fig = TamperFigures()
    cases = []
    for kind in OBJECT_KINDS + SET_KINDS:
        for key, how, damage in list(mutations(pristine, kind, rng, flips)):
            t = tamper_one(pristine, states, workdir, kind, key, how, damage)
            fig.add(t)
            cases.append(t)
            _log(log, f"{kind} {key}: {how}: {t.outcome} {t.messages[:1]}")
    return fig, cases
