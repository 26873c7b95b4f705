"""Kill drills for the commands that change a repository besides backup, prune and copy.

Each drill starts from a prepared repository (copied afresh for every run, with
the ledger of the client that made it), runs one command of the real CLI and
SIGKILLs it at a random moment or right after its k-th object write
(``crashkit.run_and_kill``).  After the kill: ``check --read-data`` is clean,
the repository opens (with the old or the new password), every snapshot that
was there and is not meant to go restores byte for byte, and every other one
still present restores as it was or as the command makes it.  Then the same
command runs again and must finish with the intended result, leaving no
temporary file behind.  Used by tests/test_crash_commands.py (a few runs per
drill) and bench/reliability.py (many).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable

import crashkit
from crashkit import PASSWORD, Figures, State, cli_argv, cli_env, run_and_kill, run_cli, timed_cli
from treeutil import describe
from walsegments import segment_bytes

NEW_PASSWORD = "crash harness new password 91c2"
OTHER_PASSWORD = "crash harness other password 5e07"  # a second writer's
EXPORT_PASSWORD = "crash harness export password 3b1d"
SEGMENTS = ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003",
            "000000010000000000000004"]


@dataclass
class Base:
    """A prepared repository: its snapshots by name (f1, d1, d2, f2, d3) and their trees."""

    root: str
    repo: str
    state: str  # XDG_STATE_HOME of the client that made it (its ledger)
    src: str
    ids: dict[str, str]
    trees: dict[str, State]  # snapshot id -> tree
    files: dict[str, str] = field(default_factory=dict)  # extra inputs: a tar, a .backup, WAL segments


def build_base(root: str, seed: int, *, target_bytes: int = 1 << 20, wal: bool = False) -> Base:
    """Two chains: f1 <- d1 <- d2 and f2 <- d3 (differentials), of a changing tree; with ``wal``, four
    archived WAL segments."""
    os.makedirs(root, exist_ok=True)
    repo, state, src = (os.path.join(root, d) for d in ("repo", "state", "src"))
    crashkit.init_repo(repo)
    tree = crashkit.SourceTree(src, random.Random(seed), target_bytes=target_bytes)
    ids: dict[str, str] = {}
    trees: dict[str, State] = {}
    with crashkit.open_repo(repo, ledger=ledger_dir(state)) as r:
        for name, kind in (("f1", "full"), ("d1", "diff"), ("d2", "diff"), ("f2", "full"), ("d3", "diff")):
            sid = r.backup([src], kind=kind).snapshot.id
            ids[name], trees[sid] = sid, tree.state()
            tree.mutate()
    base = Base(root, repo, state, src, ids, trees)
    if wal:
        rng = random.Random(seed + 1)
        for name in SEGMENTS:
            path = os.path.join(root, "wal", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(segment_bytes(name, 1 << 20, rng.randrange(1 << 30)))
            run_cli("archive-push", "-r", repo, path, "-q", env=env_of(state))
    return base


def ledger_dir(state: str) -> str:
    return os.path.join(state, "chunkvault", "ledger")


def env_of(state: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return cli_env({"XDG_STATE_HOME": state, "XDG_CACHE_HOME": state + "-cache", **(extra or {})})


@dataclass
class Run:
    """One copy of a base: the repository, its client's state, and the environment its commands run in."""

    base: Base
    root: str
    repo: str
    state: str
    env: dict[str, str]
    memo: dict = field(default_factory=dict)  # what a drill's prepare step noted (a pack id, ...)
    fig: Figures = field(default_factory=lambda: Figures("run"))  # where the checks are counted
    url: str = ""  # what the command is given as -r: the directory, or a server in front of it

    def __post_init__(self) -> None:
        self.url = self.url or self.repo

    def open(self, password: str = PASSWORD) -> crashkit.Repository:
        return crashkit.open_repo(self.repo, password, ledger=ledger_dir(self.state))


def fresh_run(base: Base, root: str, extra_env: dict[str, str] | None = None) -> Run:
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    repo, state = os.path.join(root, "repo"), os.path.join(root, "state")
    shutil.copytree(base.repo, repo, symlinks=True)
    shutil.copytree(base.state, state, symlinks=True)
    return Run(base, root, repo, state, env_of(state, extra_env))


@dataclass
class Drill:
    """One command to kill.  ``argv(run)``: its arguments (after the command's own name); ``after_kill(run)``
    checks what a kill may leave, ``done(run)`` the result once it finished; ``prepare(run)`` changes a fresh
    copy first (damage to repair, say).  ``password(run)``: the password the next run opens with."""

    name: str
    argv: Callable[[Run], list[str]]
    done: Callable[[Run], None]
    after_kill: Callable[[Run], None] | None = None
    prepare: Callable[[Run], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    again_ok: tuple[int, ...] = (0,)
    check_after_kill: bool = True  # False where the damage the command repairs is still there
    again: Callable[[Run], bool] | None = None  # whether to run it again (False: the kill came after its end)


def snapshot_map(run: Run, password: str = PASSWORD) -> dict[str, crashkit.Snapshot]:
    with run.open(password) as r:
        return {s.id: s for s in r.snapshots()}


def restore_all(run: Run, accept: Callable[[str, State], bool], scratch: str, figures: Figures,
                password: str = PASSWORD, only: set[str] | None = None) -> None:
    """Restore every present snapshot (or ``only``); ``accept(id, tree)`` judges each tree."""
    with run.open(password) as r:
        for s in r.snapshots():
            if only is not None and s.id not in only:
                continue
            out = os.path.join(scratch, f"restore-{s.id[:12]}")
            shutil.rmtree(out, ignore_errors=True)
            try:
                r.restore(s.id, out)
                got = describe(out)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            if not accept(s.id, got):
                raise AssertionError(f"{run.root}: snapshot {s.id[:12]} restored to an unexpected tree")
            figures.snapshots_verified += 1


def cli_check(run: Run, figures: Figures, password: str = PASSWORD) -> str:
    """``check --read-data`` through the CLI: must exit 0; returns what it said on stderr."""
    env = dict(run.env, CHUNKVAULT_PASSWORD=password)
    proc = subprocess.run(cli_argv("check", "-r", run.repo, "--read-data", "-q"), env=env, capture_output=True,
                          timeout=300)
    figures.checks += 1
    err = proc.stderr.decode()
    if proc.returncode != 0 or "Traceback" in err:
        raise AssertionError(f"{run.root}: check exited {proc.returncode}: {err.strip()}")
    if err.strip():
        figures.check_warnings += 1
        figures.notes.append(f"check said: {err.strip()[:300]}")
    return err


class Served:
    """``chunkvault serve`` in front of a run's repository directory (no tokens: loopback only)."""

    def __init__(self, run: Run):
        from netutil import free_port, listening

        self.port = free_port()
        self.proc = subprocess.Popen(cli_argv("serve", "--listen", f"127.0.0.1:{self.port}", "--path", run.repo,
                                              "--quiet"), env=cli_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not listening(self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise AssertionError("chunkvault serve did not start")
            time.sleep(0.05)
        run.url = f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def drill_series(drill: Drill, base: Base, workdir: str, n: int, seed: int,
                 log: Callable[[str], None] | None = None, *, http: bool = False) -> Figures:
    """``n`` kills of ``drill`` on fresh copies of ``base``, each followed by the checks and a run to the end;
    with ``http``, the command reaches the repository through ``chunkvault serve``."""
    started = time.monotonic()
    fig = Figures(drill.name + (" (http)" if http else ""))
    rng = random.Random(seed)
    scratch = os.path.join(workdir, "scratch")
    os.makedirs(scratch, exist_ok=True)
    # one complete run: how long it takes and how many objects it changes
    probe = fresh_run(base, os.path.join(workdir, "probe"), drill.env)
    probe.fig = Figures("probe")
    if drill.prepare:
        drill.prepare(probe)
    server = Served(probe) if http else None
    try:
        startup = crashkit.measure_startup(probe.url)
        before = _versions(probe.repo)
        _, elapsed = timed_cli(drill.argv(probe)[0], *drill.argv(probe)[1:], env=probe.env)
        changes = max(1, len(set(_versions(probe.repo).items()) ^ set(before.items())))
        drill.done(probe)
    finally:
        if server:
            server.stop()
    shutil.rmtree(probe.root, ignore_errors=True)
    for i in range(n):
        run = fresh_run(base, os.path.join(workdir, f"run{i}"), drill.env)
        run.fig = fig
        if drill.prepare:
            drill.prepare(run)
        server = Served(run) if http else None
        try:
            _one_kill(drill, run, fig, rng, i, startup, elapsed, changes, log)
        finally:
            if server:
                server.stop()
        shutil.rmtree(run.root, ignore_errors=True)
        shutil.rmtree(run.state + "-cache", ignore_errors=True)
    fig.seconds = time.monotonic() - started
    return fig


def _one_kill(drill: Drill, run: Run, fig: Figures, rng: random.Random, i: int, startup: float, elapsed: float,
              changes: int, log: Callable[[str], None] | None) -> None:
    """One run killed, the checks, the run to the end."""
    before = _versions(run.repo)
    by_changes = rng.random() < 0.5 or i == 0  # the first by what it changes: a quick command outruns a delay
    delay = rng.uniform(startup * 0.9, elapsed * 0.95) if elapsed > startup else rng.uniform(0, elapsed)
    k = rng.randint(1, changes) if by_changes else None
    kr = run_and_kill(cli_argv(*drill.argv(run), "-q"), delay, run.env, watch=run.repo, after_changes=k,
                      rewrites=True)
    fig.runs += 1
    fig.kills += kr.killed
    fig.finished_before_kill += not kr.killed
    if not kr.killed and kr.returncode != 0:
        raise AssertionError(f"{drill.name} run {i} failed with exit {kr.returncode}")
    changed = set(_versions(run.repo).items()) ^ set(before.items())
    fig.effective_kills += kr.killed and bool(changed)
    fig.temp_leftovers += len(crashkit.temp_leftovers(run.repo))
    if drill.check_after_kill:
        cli_check(run, fig, _password_now(run))
    if drill.after_kill:
        drill.after_kill(run)
    if drill.again is None or drill.again(run):
        proc = run_cli(*drill.argv(run), env=run.env, ok=drill.again_ok)
        if "Traceback" in proc.stderr.decode():
            raise AssertionError(f"{drill.name} run {i} again: {proc.stderr.decode()}")
    fig.recoveries += 1
    drill.done(run)
    _temp_files_go(run, drill.name, i)
    _log(log, f"{drill.name} {i + 1}: {'killed' if kr.killed else 'finished'} at {kr.delay:.3f} s"
              f"{f' (after {k} changes)' if k else ''}, {len(changed)} objects changed")


def _temp_files_go(run: Run, name: str, i: int) -> None:
    """What a killed write left (a temporary file) is removed by the next prune once an hour old."""
    left = crashkit.temp_leftovers(run.repo)
    if not left:
        return
    old = time.time() - 7200
    for path in left:
        os.utime(path, (old, old))
    run_cli("prune", "-r", run.repo, env=dict(run.env, CHUNKVAULT_PASSWORD=_password_now(run)))
    still = crashkit.temp_leftovers(run.repo)
    if still:
        raise AssertionError(f"{name} run {i}: temporary files a prune does not remove: {still}")


def _password_now(run: Run) -> str:
    """The old password where it still opens the repository, else the new one (a key change)."""
    for pw in (PASSWORD, NEW_PASSWORD, OTHER_PASSWORD):
        try:
            with run.open(pw):
                return pw
        except Exception:
            continue
    raise AssertionError(f"{run.root}: neither the old nor the new password opens the repository")


def _versions(path: str) -> dict[str, tuple[int, int]]:
    return {k: v for k, v in crashkit.object_versions(path).items() if not k.startswith("locks/")}


def _log(log: Callable[[str], None] | None, text: str) -> None:
    if log is not None:
        log(text)


# --- the drills ---------------------------------------------------------------------------------


def _exact(run: Run) -> Callable[[str, State], bool]:
    return lambda sid, got: got == run.base.trees[sid]


def _present(run: Run, password: str = PASSWORD) -> set[str]:
    return set(snapshot_map(run, password))


def _require(run: Run, names: list[str], password: str = PASSWORD) -> None:
    """The base's snapshots ``names`` are all still there."""
    missing = [n for n in names if run.base.ids[n] not in _present(run, password)]
    if missing:
        raise AssertionError(f"{run.root}: snapshot(s) {missing} not meant to go are gone")


def _nothing_to_prune(run: Run) -> None:
    with run.open() as r:
        rest = r.prune(dry_run=True, max_unused=0)
    if rest.delete or rest.repack or rest.orphans:
        raise AssertionError(f"{run.root}: forget --prune left work undone: {rest.to_dict()}")


def _forgot(gone: list[str], kept: list[str], pruned: bool = True) -> Callable[[Run], None]:
    def done(run: Run) -> None:
        present = _present(run)
        assert not {run.base.ids[n] for n in gone} & present, f"{run.root}: {gone} still there"
        _require(run, kept)
        restore_all(run, _exact(run), os.path.join(run.root, "scratch"), run.fig)
        if pruned:
            _nothing_to_prune(run)
        cli_check(run, run.fig)
    return done


def _after_forget_kill(kept: list[str]) -> Callable[[Run], None]:
    def after(run: Run) -> None:
        _require(run, kept)
        restore_all(run, _exact(run), os.path.join(run.root, "scratch"), run.fig)
    return after


EXCLUDED = "a/deep"


def _without(tree: State, prefix: bytes = EXCLUDED.encode()) -> State:
    return {k: v for k, v in tree.items() if k != prefix and not k.startswith(prefix + b"/")}


def _rewritten_or_not(run: Run) -> None:
    def accept(sid: str, got: State) -> bool:
        return got in (run.base.trees[sid], _without(run.base.trees[sid]))
    _require(run, list(run.base.ids))
    restore_all(run, accept, os.path.join(run.root, "scratch"), run.fig)


def _rewritten(run: Run) -> None:
    _require(run, list(run.base.ids))
    restore_all(run, lambda sid, got: got == _without(run.base.trees[sid]), os.path.join(run.root, "scratch"),
                run.fig)
    cli_check(run, run.fig)


def _all_there(run: Run) -> None:
    _require(run, list(run.base.ids))
    restore_all(run, _exact(run), os.path.join(run.root, "scratch"), run.fig, only=set(run.base.trees))


def _rehosted(run: Run) -> None:
    _all_there(run)
    hosts = {s.host for s in snapshot_map(run).values()}
    assert hosts == {"elsewhere"}, f"{run.root}: hosts after rewrite --new-host: {hosts}"


def _tagged(run: Run) -> None:
    _all_there(run)
    untagged = [s.id[:8] for s in snapshot_map(run).values() if "drill" not in s.tags]
    assert not untagged, f"{run.root}: not tagged: {untagged}"


def _repaired_index(run: Run) -> None:
    _all_there(run)
    cli_check(run, run.fig)


def _pack_of(run: Run, name: str) -> str:
    """A data pack that only snapshot ``name``'s own data uses (the newest pack it added)."""
    with run.open() as r:
        snap = r.snapshot(run.base.ids[name])
        others = [s for s in r.snapshots() if s.id != snap.id]
        mine = crashkit.tree_blobs(r.store, snap)
        theirs = {bytes.fromhex(h) for s in r.snapshots() for h in s.manifest}  # a lost manifest: beyond repair
        for s in others:
            theirs |= crashkit.tree_blobs(r.store, s)
        index = crashkit.indexed_blobs(r.store)
    only = {index[b][0][0].hex() for b in mine - theirs if b in index}
    shared = {index[b][0][0].hex() for b in theirs if b in index}
    candidates = sorted(only - shared)
    assert candidates, "no pack holds only the newest snapshot's data"
    return candidates[-1]


def _damage_pack(run: Run) -> None:
    """Flip bytes in the middle of a pack only d3 uses (its data section)."""
    pid = _pack_of(run, "d3")
    path = os.path.join(run.repo, "data", pid[:2], pid)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in range(len(data) // 3, len(data) // 3 + 16):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)
    run.memo["pack"] = pid


def _drop_pack(run: Run) -> None:
    """A pack only d3 uses is lost, and `repair index` has dropped it from the index."""
    pid = _pack_of(run, "d3")
    os.remove(os.path.join(run.repo, "data", pid[:2], pid))
    run.memo["pack"] = pid
    run_cli("repair", "-r", run.repo, "index", env=run.env)


def _subset_of_original(run: Run) -> Callable[[str, State], bool]:
    """d3 may have lost files (dropped by the repair); what it keeps is as it was; the others are exact."""
    def accept(sid: str, got: State) -> bool:
        want = run.base.trees[sid]
        if sid != run.base.ids["d3"]:
            return got == want
        return all(want.get(k) == v or (v[0] == "dir" and want.get(k, ("",))[0] == "dir") for k, v in got.items())
    return accept


def _salvaged(run: Run) -> None:
    """After `repair packs`: the damaged pack is gone; `repair snapshots` then leaves a clean repository."""
    assert not os.path.exists(os.path.join(run.repo, "data", run.memo["pack"][:2], run.memo["pack"])), \
        f"{run.root}: the damaged pack is still there"
    run_cli("repair", "-r", run.repo, "snapshots", "--confirm", "REPAIR", env=run.env)
    _snapshots_repaired(run)


def _snapshots_repaired(run: Run) -> None:
    _require(run, list(run.base.ids))
    restore_all(run, _subset_of_original(run), os.path.join(run.root, "scratch"), run.fig)
    cli_check(run, run.fig)


def _after_repair_kill(run: Run) -> None:
    """The damage may still be there: every snapshot but d3 restores exactly."""
    _require(run, list(run.base.ids))
    others = {run.base.ids[n] for n in ("f1", "d1", "d2", "f2")}
    restore_all(run, _exact(run), os.path.join(run.root, "scratch"), run.fig, only=others)


def _opens(run: Run, password: str) -> bool:
    try:
        with run.open(password):
            return True
    except Exception:
        return False


def _either_password(run: Run) -> None:
    pw = _password_now(run)
    _require(run, list(run.base.ids), pw)
    restore_all(run, _exact(run), os.path.join(run.root, "scratch"), run.fig, password=pw,
                only={run.base.ids["d3"]})


def _password_changed(run: Run) -> None:
    assert _opens(run, NEW_PASSWORD), f"{run.root}: the new password does not open the repository"
    assert not _opens(run, PASSWORD), f"{run.root}: the old password still opens the repository"
    keys = [n for n in os.listdir(os.path.join(run.repo, "keys")) if not n.startswith(".tmp-")]  # a killed write's
    assert len(keys) == 1, f"{run.root}: a rerun left {len(keys)} keys for the new password"


def _key_added(run: Run) -> None:
    assert _opens(run, NEW_PASSWORD) and _opens(run, PASSWORD), f"{run.root}: a password no longer opens"


def _add_second_key(run: Run) -> None:
    with run.open() as r:
        run.memo["key"] = r.add_key(NEW_PASSWORD, kdf_seconds=0)


def _key_there(run: Run) -> bool:
    return os.path.exists(os.path.join(run.repo, "keys", run.memo["key"]))


def _pack_there(run: Run) -> bool:
    """Whether the damaged pack is still stored (else a kill came after `repair packs` dropped it: run again
    it says there is no such pack)."""
    return os.path.exists(os.path.join(run.repo, "data", run.memo["pack"][:2], run.memo["pack"]))


def _key_removed(run: Run) -> None:
    assert _opens(run, PASSWORD), f"{run.root}: the remaining password does not open the repository"
    assert not _opens(run, NEW_PASSWORD), f"{run.root}: the removed key still opens the repository"


def _imported(run: Run) -> None:
    _all_there(run)
    extra = [s for s in snapshot_map(run).values() if s.id not in run.base.trees]
    assert len(extra) == 1, f"{run.root}: {len(extra)} snapshots imported"
    want = run.base.files["backup-tree"]
    restore_all(run, lambda sid, got: got == want, os.path.join(run.root, "scratch"), run.fig,
                only={extra[0].id})
    cli_check(run, run.fig)


def _tar_imported(run: Run) -> None:
    _all_there(run)
    extra = [s for s in snapshot_map(run).values() if s.id not in run.base.trees]
    assert extra, f"{run.root}: nothing imported"
    want = _to_us(run.base.files["tar-tree"])
    restore_all(run, lambda sid, got: _to_us(got) == want, os.path.join(run.root, "scratch"), run.fig,
                only={s.id for s in extra})
    cli_check(run, run.fig)


def _to_us(tree: State) -> State:
    """A tree without its times (a tar holds them rounded)."""
    return {k: (v[:2] + (0,) + v[3:]) for k, v in tree.items()}


def _after_import_kill(run: Run) -> None:
    _require(run, list(run.base.ids))
    restore_all(run, _exact(run), os.path.join(run.root, "scratch"), run.fig, only=set(run.base.trees))


NEW_SEGMENT = "000000010000000000000005"


def _pushed(run: Run) -> None:
    out = os.path.join(run.root, "got")
    run_cli("archive-get", "-r", run.repo, NEW_SEGMENT, out, env=run.env)
    with open(out, "rb") as f, open(run.base.files["segment"], "rb") as g:
        assert f.read() == g.read(), f"{run.root}: archive-get gave other bytes"
    cli_check(run, run.fig)


def _wal_names(run: Run) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(run.repo, "wal")) if not n.startswith(".tmp-"))


def _expired(run: Run) -> None:
    assert _wal_names(run) == SEGMENTS[2:], f"{run.root}: wal after archive-expire: {_wal_names(run)}"
    run_cli("prune", "-r", run.repo, "--max-unused", "0", env=run.env)
    cli_check(run, run.fig)
    _all_there(run)


def _after_expire_kill(run: Run) -> None:
    assert set(SEGMENTS[2:]) <= set(_wal_names(run)), f"{run.root}: a segment not meant to go is gone"
    _require(run, list(run.base.ids))


def _config_set(run: Run) -> None:
    doc = json.loads(run_cli("config", "-r", run.repo, "--json", env=run.env).stdout)
    assert doc["settings"]["compression_level"] == 3, f"{run.root}: config {doc}"
    _all_there(run)


def add_inputs(base: Base, seed: int) -> None:
    """The files the import drills read: a .backup from another repository, a tar, a WAL segment."""
    rng = random.Random(seed)
    other = os.path.join(base.root, "other")
    crashkit.init_repo(other, compression=3)
    tree = crashkit.SourceTree(os.path.join(base.root, "other-src"), rng, target_bytes=1 << 20)
    with crashkit.open_repo(other, ledger=False) as r:
        sid = r.backup([tree.root]).snapshot.id
        path = os.path.join(base.root, "snap.backup")
        r.export(sid, path, EXPORT_PASSWORD, kdf_seconds=0)
    base.files["backup"] = path
    base.files["backup-tree"] = tree.state()
    tar = os.path.join(base.root, "tree.tar")
    with tarfile.open(tar, "w") as tf:
        tf.add(tree.root, arcname=".")
    base.files["tar"] = tar
    base.files["tar-tree"] = tree.state()
    seg = os.path.join(base.root, NEW_SEGMENT)
    with open(seg, "wb") as f:
        f.write(segment_bytes(NEW_SEGMENT, 1 << 20, rng.randrange(1 << 30), filled=1.0))
    base.files["segment"] = seg


def drills() -> dict[str, Drill]:
    return {
        "forget-full": Drill("forget a full (rebase) --prune",
                             lambda r: ["forget", "-r", r.url, r.base.ids["f1"], "--prune", "--max-unused", "0"],
                             _forgot(["f1"], ["d1", "d2", "f2", "d3"]),
                             _after_forget_kill(["d1", "d2", "f2", "d3"])),
        "forget-policy": Drill("forget --keep-last 1 --prune",
                               lambda r: ["forget", "-r", r.url, "--keep-last", "1", "--prune", "--max-unused", "0"],
                               _forgot(["f1", "d1", "d2", "f2"], ["d3"]), _after_forget_kill(["d3"])),
        "aggregate": Drill("aggregate --retire", lambda r: ["aggregate", "-r", r.url, r.base.ids["d2"], "--retire"],
                           _forgot(["f1", "d1"], ["d2", "f2", "d3"], pruned=False),
                           _after_forget_kill(["d2", "f2", "d3"])),
        "rewrite": Drill("rewrite --exclude",
                         lambda r: ["rewrite", "-r", r.url, "--exclude", EXCLUDED, "--confirm", "REWRITE"],
                         _rewritten, _rewritten_or_not),
        "rehost": Drill("rewrite --new-host",
                        lambda r: ["rewrite", "-r", r.url, "--host", os.uname().nodename, "--new-host", "elsewhere",
                                   "--confirm", "REWRITE"], _rehosted, _all_there),
        "tag": Drill("tag --add", lambda r: ["tag", "-r", r.url, "--add", "drill"], _tagged, _all_there),
        "repair-index": Drill("repair index", lambda r: ["repair", "-r", r.url, "index"], _repaired_index,
                              _all_there),
        "repair-snapshots": Drill("repair snapshots",
                                  lambda r: ["repair", "-r", r.url, "snapshots", "--confirm", "REPAIR"],
                                  _snapshots_repaired, _after_repair_kill, prepare=_drop_pack,
                                  check_after_kill=False),
        "repair-packs": Drill("repair packs",
                              lambda r: ["repair", "-r", r.url, "packs", r.memo["pack"], "--confirm", "REPAIR"],
                              _salvaged, _after_repair_kill, prepare=_damage_pack, check_after_kill=False,
                              again=_pack_there),
        "key-passwd": Drill("key passwd", lambda r: ["key", "passwd", "-r", r.url, "--kdf-time", "0"],
                            _password_changed, _either_password, env={"CHUNKVAULT_NEW_PASSWORD": NEW_PASSWORD},
                            again=lambda r: _opens(r, PASSWORD)),
        "key-add": Drill("key add", lambda r: ["key", "add", "-r", r.url, "--kdf-time", "0"], _key_added,
                         _either_password, env={"CHUNKVAULT_NEW_PASSWORD": NEW_PASSWORD}),
        "key-remove": Drill("key remove", lambda r: ["key", "remove", "-r", r.url, r.memo["key"]], _key_removed,
                            _either_password, prepare=_add_second_key, again=_key_there),
        "import": Drill("import .backup", lambda r: ["import", "-r", r.url, r.base.files["backup"]], _imported,
                        _after_import_kill, env={"CHUNKVAULT_EXPORT_PASSWORD": EXPORT_PASSWORD}),
        "import-tar": Drill("import-tar", lambda r: ["import-tar", "-r", r.url, r.base.files["tar"], "--path",
                                                     "/imported"], _tar_imported, _after_import_kill),
        "archive-push": Drill("archive-push", lambda r: ["archive-push", "-r", r.url, r.base.files["segment"]],
                              _pushed, _after_import_kill),
        "archive-expire": Drill("archive-expire", lambda r: ["archive-expire", "-r", r.url, "--before", SEGMENTS[2]],
                                _expired, _after_expire_kill),
        "config-set": Drill("config set", lambda r: ["config", "-r", r.url, "set", "compression", "3"], _config_set,
                            _all_there),
    }


# --- two writers at once --------------------------------------------------------------------------


@dataclass
class Raced:
    """How two commands started together ended: exit code and stderr of each."""

    codes: list[int]
    errors: list[str]


def race(run: Run, *argvs: list[str], envs: list[dict[str, str]] | None = None, stagger: float = 0.0) -> Raced:
    """Start the commands together (``stagger`` seconds apart) and wait for all of them."""
    procs = []
    for i, argv in enumerate(argvs):
        env = (envs[i] if envs else None) or run.env
        procs.append(subprocess.Popen(cli_argv(*argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        if stagger:
            time.sleep(stagger)
    out = Raced([], [])
    for p in procs:
        _, err = p.communicate(timeout=300)
        out.codes.append(p.returncode)
        out.errors.append(err.decode())
    for code, err in zip(out.codes, out.errors):
        if "Traceback" in err:
            raise AssertionError(f"{run.root}: a traceback: {err}")
    return out


def refused_clearly(code: int, err: str) -> bool:
    """A second writer refused: the lock's exit code and a line that says another command holds it."""
    return code == 15 and "lock" in err.lower() and err.count("\n") <= 3
