"""Random histories of a repository's life, checked against a model written from the README's words.

Backups (full, diff, auto; tags, hosts, two sources; dated by ``time=``, some backdated, some at the edges of
summer time), forget by policy (every rule, their combinations, group-by, host/tag/path filters, a clock
ahead of or behind the snapshots) and by id, ``forget`` on the command line, prune (dry run first; with
``max_repack_size``, run until it settles), aggregate (with and without retiring), rewrite (paths and hosts),
copy (and retention there), export and import.  After each step: the listing is the model's, the model's
retention decisions are forget's, a dry run is what the run then does, the same rules run again remove
nothing, ``check --read-data`` is clean, kept snapshots restore byte-exact (every one in both repositories at
the end), and ``latest`` at and around snapshots' times is the one the README names.
"""
from __future__ import annotations

import calendar
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from chunkvault import Repository
from chunkvault.store.retention import RetentionPolicy
from servers_http import FULL_TOKEN, http_server, serve_factory  # noqa: F401
from treeutil import describe

PW = "pw"
UTC = timezone.utc
AHEAD = timedelta(minutes=5)
HOSTS = ["h1", "h2", "h3"]
TAGS = ["daily", "pinned", "x"]


@dataclass
class Model:
    """A snapshot as the model knows it: what it holds, and the kind it was taken as (retention's tier)."""

    id: str
    time: datetime
    kind: str
    taken_as: str
    host: str
    path: str
    tags: tuple[str, ...]
    state: dict
    after: int = 0  # an import of a snapshot of the same time that it heals is ordered after that one


# ----------------------------------------------------------------------------- the README's retention rules


def _bucket(rule: str, t: datetime, tz) -> tuple:
    t = t.astimezone(tz)
    return {"hourly": (t.year, t.month, t.day, t.hour), "daily": (t.year, t.month, t.day),
            "weekly": tuple(t.isocalendar()[:2]), "monthly": (t.year, t.month), "yearly": (t.year,)}[rule]


def _before(t: datetime, d, tz) -> datetime:
    """``d`` before ``t``: months and years along the zone's calendar (clamped to the month's end), then
    days and hours as elapsed time."""
    if isinstance(d, timedelta):
        return t - d
    wall = t.astimezone(tz).replace(tzinfo=None)
    y, m = divmod(wall.year * 12 + wall.month - 1 - d.years * 12 - d.months, 12)
    day = min(wall.day, calendar.monthrange(y, m + 1)[1])
    return wall.replace(year=y, month=m + 1, day=day, tzinfo=tz).astimezone(UTC) - timedelta(days=d.days,
                                                                                           hours=d.hours)


def model_kept(snaps: list[Model], parents: dict, pol: dict, now: datetime, tz, group_by, outside: set) -> set:
    """The ids a policy keeps of ``snaps`` (``outside``: the repository's others, which stay).  Per group,
    newest first: keep-last the N newest; a calendar rule the newest of each of the N newest buckets, and
    the oldest snapshot while buckets remain; keep-within all newer than the newest (not ahead of now) minus
    D; keep-within-<bucket> the newest of each bucket within it; keep-tag those with every tag of a set
    (none: the untagged); the tiers by the kind taken as, against now; keep-full the N newest fulls and
    keep-diff the N newest differentials of a chain reaching a full of which a snapshot before it stays,
    a kept differential with none before it counting as the full it becomes.  Snapshots dated more than
    5 minutes ahead of now are kept and counted by no rule."""
    kept: dict[str, list] = {s.id: ["ahead"] for s in snaps if s.time > now + AHEAD}
    groups: dict = {}
    for s in snaps:
        if s.id not in kept:
            key = (s.host if "host" in group_by else None, s.path if "paths" in group_by else None,
                   tuple(sorted(s.tags)) if "tags" in group_by else None)
            groups.setdefault(key, []).append(s)
    for g in groups.values():
        g.sort(key=lambda s: (s.time, s.after, s.id), reverse=True)
        past = [s.time for s in g if s.time <= now]
        latest = max(past) if past else now
        for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            n = pol.get(f"keep_{rule}")
            if not n:
                continue
            used: list = []
            for i, s in enumerate(g):
                b = i if rule == "last" else _bucket(rule, s.time, tz)
                if used and used[-1] == b:
                    if i == len(g) - 1 and (n == -1 or len(used) < n):
                        kept.setdefault(s.id, []).append("oldest")
                    continue
                if n != -1 and len(used) >= n:
                    break
                used.append(b)
                kept.setdefault(s.id, []).append(rule)
        if pol.get("keep_within"):
            cut = _before(latest, pol["keep_within"], tz)
            for s in g:
                if s.time > cut:
                    kept.setdefault(s.id, []).append("within")
        for rule in ("hourly", "daily", "weekly", "monthly", "yearly"):
            if pol.get(f"keep_within_{rule}"):
                cut = _before(latest, pol[f"keep_within_{rule}"], tz)
                seen = set()
                for s in g:
                    if s.time > cut and _bucket(rule, s.time, tz) not in seen:
                        seen.add(_bucket(rule, s.time, tz))
                        kept.setdefault(s.id, []).append("within " + rule)
        for tags in pol.get("keep_tags", ()):
            for s in g:
                if (set(tags) <= set(s.tags)) if tags else not s.tags:
                    kept.setdefault(s.id, []).append("tag")
        for kind in ("full", "diff"):
            if pol.get(f"keep_{kind}_within"):
                cut = _before(now, pol[f"keep_{kind}_within"], tz)
                for s in g:
                    if s.taken_as == kind and s.time > cut:
                        kept.setdefault(s.id, []).append(kind + " tier")
    if not (pol.get("keep_full") or pol.get("keep_diff")):
        return set(kept)

    def before(sid: str) -> list[str]:
        out, p = [], parents[sid]
        while p is not None and p in parents:
            out.append(p)
            p = parents[p]
        return out

    base, promoted = kept, set()
    for _ in range(len(snaps) + 1):
        kept = {k: list(v) for k, v in base.items()}
        for g in groups.values():
            n = pol.get("keep_full")
            fulls = [s for s in g if parents[s.id] is None or s.id in promoted]
            for s in (fulls if n == -1 else fulls[:n or 0]):
                kept.setdefault(s.id, []).append("full")
        for g in groups.values():
            n, count = pol.get("keep_diff"), 0
            for s in g if n else ():
                if count == n:
                    break
                chain = before(s.id)
                if parents[s.id] and parents[chain[-1]] is None and any(a in kept or a in outside for a in chain):
                    count += 1
                    kept.setdefault(s.id, []).append("diff")
        now_promoted = {s.id for s in snaps if parents[s.id] is not None and s.id in kept
                        and not any(a in kept or a in outside for a in before(s.id))}
        if now_promoted == promoted:
            break
        promoted = now_promoted
    return set(kept)


def _stripped(state: dict, glob: str) -> dict:
    """A tree without what an exclude of ``glob`` (a name, or a path below the root) takes."""
    import fnmatch

    def hit(path: bytes) -> bool:
        parts = path.decode().split("/")
        return any(fnmatch.fnmatch("/".join(parts[:i + 1]), glob) or fnmatch.fnmatch(p, glob)
                   for i, p in enumerate(parts))
    return {k: v for k, v in state.items() if k == b"." or not hit(k)}


# ----------------------------------------------------------------------------- the drill


class Drill:
    def __init__(self, seed: int, url: str, work, open_kw: dict):
        self.rnd = random.Random(seed)
        self.work = work
        self.url, self.open_kw = url, open_kw
        self.repo = Repository.init(url, PW, kdf_seconds=0, pack_size=60_000,
                                    full_every=self.rnd.choice([4, 8, 23]), max_diff_share=1, **open_kw)
        self.repo2 = Repository.init(str(work / "repo2"), PW, kdf_seconds=0, pack_size=60_000)
        self.model: dict[str, Model] = {}
        self.model2: dict[str, dict] = {}  # the copy repository: id -> tree
        self.src = {p: work / p for p in ("srcA", "srcB")}
        for root in self.src.values():
            root.mkdir()
            self.change(root)
        # a year of history that ends before this clock (a backup is dated at most 5 minutes ahead of it), an
        # hour or more from the edges of the command line's tiers, which count from its own clock
        self.end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=2, hours=1)
        self.clock = self.end - timedelta(days=365)
        self.tz = ZoneInfo(self.rnd.choice(["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC"]))
        hours = [self.clock + timedelta(hours=h) for h in range(365 * 24)]
        self.edges = [t for a, t in zip(hours, hours[1:]) if a.astimezone(self.tz).utcoffset() !=
                      t.astimezone(self.tz).utcoffset()] or [self.clock]  # the zone's summer time changes
        self.steps = 0

    def change(self, root) -> None:
        r = self.rnd
        db = root / "db.bin"
        if not db.exists():
            db.write_bytes(r.randbytes(150_000))
        else:
            with open(db, "r+b") as f:  # changed in place: stored as deltas
                for _ in range(r.randrange(1, 6)):
                    f.seek(r.randrange(149_990))
                    f.write(r.randbytes(8))
        for _ in range(r.randrange(3)):
            p = root / r.choice(["a.txt", "sub/c.txt", "sub/d/e.bin", "secret.key", "sub/secret2"])
            if p.exists() and r.random() < 0.4:
                p.unlink()
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(r.randbytes(r.randrange(30_000)))
        t = 1_700_000_000 + r.randrange(10**8)
        os.utime(db, (t, t))

    def next_time(self) -> datetime:
        r = self.rnd
        c = r.random()
        if c < 0.6:
            self.clock += timedelta(minutes=r.choice([1, 17, 59, 61, 300, 1440, 1500, 10080]))
        elif c < 0.8:
            self.clock += timedelta(seconds=r.randrange(90 * 86400))
        elif c < 0.9:
            self.clock -= timedelta(seconds=r.randrange(1, 10 * 86400))  # backdated
        else:  # around summer time's start or end
            self.clock = r.choice(self.edges) + timedelta(minutes=r.randrange(-90, 90))
        self.clock = min(self.clock, self.end)
        return self.clock.replace(microsecond=r.randrange(10**6))

    def parents(self) -> dict:
        return {s.id: s.parent for s in self.repo.snapshots()}

    def random_policy(self) -> dict:
        r = self.rnd
        if r.random() < 0.25:  # tiers alone, as the README gives them: fulls kept longer than differentials
            diffs, fulls = r.choice([("12h", "12h"), ("12h", "1d12h"), ("12h", "5d"), ("2d", "2d"), ("2d", "6d"),
                                     ("2d", "20d"), ("9d", "9d"), ("9d", "27d"), ("9d", "90d")])
            return {"keep_full_within": fulls, "keep_diff_within": diffs}
        pol = {}
        for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly", "full", "diff"):
            if r.random() < 0.22:
                pol[f"keep_{rule}"] = r.choice([1, 2, 3, 5, -1])
        for rule in ("within", "within_hourly", "within_daily", "within_weekly", "within_monthly", "full_within",
                     "diff_within"):
            if r.random() < (0.3 if rule.endswith("full_within") or rule.startswith("diff") else 0.12):
                pol[f"keep_{rule}"] = r.choice(["12h", "1d", "2d", "1w", "1m", "3m", "1y"])
        if r.random() < 0.2:
            pol["keep_tags"] = (r.choice([("pinned",), ("daily", "x"), ()]),)
        return pol or {"keep_last": 2}

    # --- operations

    def backup(self) -> None:
        r = self.rnd
        path = r.choice(list(self.src))
        self.change(self.src[path])
        kind = r.choices(["auto", "diff", "full"], [6, 4, 1])[0]
        tags = tuple(sorted(r.sample(TAGS, r.randrange(3))))
        host = r.choices(HOSTS, [8, 1, 1])[0]
        t = self.next_time()
        state = describe(self.src[path])
        s = self.repo.backup([str(self.src[path])], kind=kind, tags=list(tags), host=host, time=t).snapshot
        assert s.datetime == t and (kind != "full" or s.kind == "full")
        self.model[s.id] = Model(s.id, t, s.kind, s.kind, host, str(self.src[path]), tags, state)

    def forget_policy(self) -> None:
        r = self.rnd
        pol = self.random_policy()
        policy = RetentionPolicy(**pol, group_by=frozenset(r.sample(["host", "paths", "tags"], r.randrange(4))))
        filters = {}
        if r.random() < 0.3:
            filters["hosts"] = [r.choice(HOSTS)]
        if r.random() < 0.2:
            filters["tags"] = [r.choice(TAGS)]
        if r.random() < 0.2:
            filters["paths"] = [str(r.choice(list(self.src.values())))]
        newest = max(m.time for m in self.model.values())
        c = r.random()  # the clock: just past the newest, long past it (a source stopped), or behind it
        now = newest + (timedelta(seconds=r.randrange(3 * 86400)) if c < 0.5 else
                        timedelta(seconds=r.randrange(40 * 86400)) if c < 0.7 else
                        -timedelta(seconds=r.randrange(40 * 86400)))
        allow = r.random() < 0.5
        kw = dict(policy=policy, now=now, tz=self.tz, allow_remove_all=allow, **filters)
        try:
            dry = self.planned(pol, kw)
        except Exception as exc:  # a policy keeping none of a group
            assert not allow and "refusing to remove them all" in str(exc), exc
            return
        done = self.repo.forget(**kw)
        assert (done.decisions, done.remove, done.rebases) == (dry.decisions, dry.remove, dry.rebases)
        self.forgotten(done.remove, done.rebases)
        again = self.repo.forget(dry_run=True, **{**kw, "allow_remove_all": True})
        assert not again.remove, ("the same rules run again remove", again.decisions)
        # and as time goes by: the kind each was taken as, after rebases, decides its tier
        self.planned(pol, {**kw, "allow_remove_all": True, "now": now + timedelta(hours=r.randrange(24 * 60))})

    def planned(self, pol: dict, kw: dict):
        """forget's dry run, its decisions checked against the model's."""
        policy, filters = kw["policy"], {k: kw[k] for k in ("hosts", "tags", "paths") if k in kw}
        listed = {s.id: s for s in self.repo.snapshots()}
        picked = {s.id for s in self.repo.snapshots(**filters)} if filters else set(listed)
        outside = set(listed) - picked
        expected = model_kept([self.model[i] for i in picked], {i: s.parent for i, s in listed.items()},
                              {k: getattr(policy, k) for k in pol}, kw["now"], self.tz, policy.group_by,
                              outside) | outside
        dry = self.repo.forget(dry_run=True, **kw)
        got = {d.snapshot_id for d in dry.decisions if d.keep}
        assert got == expected, (policy, kw, [(d.snapshot_id[:8], d.reasons) for d in dry.decisions])
        return dry

    def forget_cli(self) -> None:
        r = self.rnd
        pol = self.random_policy()
        group_by = r.sample(["host", "paths", "tags"], r.randrange(4))
        args = []
        for k, v in pol.items():
            for value in ([",".join(tags) for tags in v] if k == "keep_tags" else [str(v)]):
                args += ["--" + k.replace("_", "-").replace("tags", "tag"), value]
        args += ["--group-by", ",".join(group_by)]
        host = r.choice(HOSTS) if r.random() < 0.3 else None
        args += ["--host", host] if host else []
        args += ["--unsafe-allow-remove-all"] if r.random() < 0.3 else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_") or k == "CHUNKVAULT_CACHE_DIR"}
        env.update(CHUNKVAULT_PASSWORD=PW, TZ=str(self.tz))
        if "token" in self.open_kw:
            env["CHUNKVAULT_HTTP_TOKEN"] = self.open_kw["token"]
        listed = {s.id: s for s in self.repo.snapshots()}
        picked = {i for i, s in listed.items() if host in (None, s.host)}
        policy = RetentionPolicy(**pol, group_by=group_by)
        expected = model_kept([self.model[i] for i in picked], {i: s.parent for i, s in listed.items()},
                              {k: getattr(policy, k) for k in pol}, datetime.now(UTC), self.tz,
                              policy.group_by, set(listed) - picked) | (set(listed) - picked)
        argv = [sys.executable, "-m", "chunkvault.cli", "forget", "-r", self.url, "--json", *args]
        dry = subprocess.run([*argv, "--dry-run"], env=env, capture_output=True, timeout=120)
        if dry.returncode:
            assert b"refusing to remove them all" in dry.stderr, dry.stderr
            return
        planned = json.loads(dry.stdout)
        assert {d["id"] for d in planned["decisions"] if d["keep"]} == expected, (args, planned["decisions"])
        run = subprocess.run(argv, env=env, capture_output=True, timeout=120)
        assert run.returncode == 0, run.stderr
        done = json.loads(run.stdout)
        assert (done["decisions"], done["rebased"]) == (planned["decisions"], planned["rebased"])
        for d in done["decisions"]:
            if not d["keep"]:
                del self.model[d["id"]]
        for s in self.repo.snapshots():
            self.model[s.id].kind = s.kind

    def forgotten(self, removed: list[str], rebases) -> None:
        for step in rebases:
            if step.new_parent is None:  # it absorbed its full: a full, of a differential's tier
                self.model[step.diff_id].kind = "full"
        for sid in removed:
            del self.model[sid]

    def forget_ids(self) -> None:
        ids = self.rnd.sample(list(self.model), self.rnd.randrange(1, min(3, len(self.model)) + 1))
        dry = self.repo.forget(ids, dry_run=True)
        done = self.repo.forget(ids)
        assert sorted(done.remove) == sorted(dry.remove) == sorted(ids) and done.rebases == dry.rebases
        self.forgotten(done.remove, done.rebases)

    def prune(self) -> None:
        r = self.rnd
        kw = {"max_unused": 0.0} if r.random() < 0.5 else {}
        if r.random() < 0.3:
            kw["max_repack_size"] = r.choice(["30K", "100K", "1M"])

        def plan(p) -> tuple:
            return sorted(u.pack_id for u in p.delete), sorted(u.pack_id for u in p.repack), p.freed_bytes
        dry = self.repo.prune(dry_run=True, **kw)
        assert plan(self.repo.prune(**kw)) == plan(dry), kw
        if "max_repack_size" in kw:  # a part at a time, until what is left is what the limit holds back
            for _ in range(15):
                done = self.repo.prune(**kw)
                if not (done.repack or done.delete):
                    break
            assert not (done.repack or done.delete) and len(done.held_back) == done.over_limit, kw

    def aggregate(self) -> None:
        diffs = [s for s in self.repo.snapshots() if s.kind == "diff"]
        if not diffs:
            return
        snap = self.rnd.choice(diffs)
        retire = self.rnd.random() < 0.5
        parents, chain, p = self.parents(), [], snap.parent
        while p is not None:
            chain.append(p)
            p = parents[p]
        done = self.repo.aggregate(snap.id, retire=retire)
        self.model[snap.id].kind = self.model[snap.id].taken_as = "full"
        assert sorted(done.retired) == (sorted(chain) if retire else [])
        self.forgotten(done.retired, done.rebases)

    def rewrite(self) -> None:
        hosts = [self.rnd.choice(HOSTS)] if self.rnd.random() < 0.5 else []
        glob = self.rnd.choice(["secret*", "sub/d"])
        self.repo.rewrite([glob], dry_run=False, hosts=hosts)
        for m in self.model.values():  # a chain keeps one host: a differential loses what its parent lost
            if not hosts or m.host in hosts:
                m.state = _stripped(m.state, glob)

    def rehost(self) -> None:
        old, new = self.rnd.sample(HOSTS, 2)
        if any(m.host == old for m in self.model.values()):
            self.repo.rewrite(hosts=[old], new_host=new, dry_run=False)
            for m in self.model.values():
                m.host = new if m.host == old else m.host

    def copy(self) -> None:
        tags = [self.rnd.choice(TAGS)] if self.rnd.random() < 0.4 else []
        done = self.repo.copy_to(self.repo2, tags=tags)
        for source, copied in done.copied:
            self.model2[copied] = self.model[source].state
        policy = RetentionPolicy(**self.random_policy())
        now = max(m.time for m in self.model.values()) + timedelta(hours=self.rnd.randrange(100))
        try:
            plan = self.repo2.forget(policy=policy, now=now, tz=self.tz)
        except Exception as exc:
            assert "refusing to remove them all" in str(exc), exc
            return
        for sid in plan.remove:
            del self.model2[sid]
        assert not self.repo2.forget(policy=policy, now=now, tz=self.tz, dry_run=True).remove
        self.repo2.prune(max_unused=0.0)
        self.verify2()

    def export_import(self) -> None:
        sid = self.rnd.choice(list(self.model))
        path = str(self.work / "one.backup")
        self.repo.export(sid, path, "export pw", kdf_seconds=0, overwrite=True)
        into_copy = self.rnd.random() < 0.7
        done = (self.repo2 if into_copy else self.repo).import_backup(path, "export pw")
        m = self.model[sid]
        if done.skipped:
            return
        assert done.snapshot.datetime == m.time
        if into_copy:
            self.model2[done.snapshot.id] = m.state
        else:
            self.model[done.snapshot.id] = Model(done.snapshot.id, m.time, "full", "full", m.host, m.path, m.tags,
                                                 m.state, m.after + 1)

    # --- checks

    def restores(self, repo, sid: str) -> dict:
        target = self.work / f"restore{self.steps}-{sid[:8]}"
        repo.restore(sid, str(target))
        try:
            return describe(target)
        finally:
            shutil.rmtree(target)

    def verify2(self) -> None:
        assert {s.id for s in self.repo2.snapshots()} == set(self.model2)
        assert self.repo2.check(read_data=True).ok
        for sid, state in self.model2.items():
            assert self.restores(self.repo2, sid) == state, sid

    def verify(self, restore_all: bool) -> None:
        listed = {s.id: s for s in self.repo.snapshots()}
        assert set(listed) == set(self.model)
        for sid, s in listed.items():
            m = self.model[sid]
            assert (s.datetime, s.kind, s.host, tuple(sorted(s.tags))) == (m.time, m.kind, m.host, m.tags), sid
        report = self.repo.check(read_data=True)
        assert report.ok, report
        for sid in listed if restore_all else self.rnd.sample(list(listed), min(2, len(listed))):
            assert self.restores(self.repo, sid) == self.model[sid].state, sid
        self.verify_until()

    def verify_until(self) -> None:
        """``latest`` at or before T: the newest snapshot at or before T; T given to the second in local time
        (with its offset in the hour repeated) takes that whole second."""
        snaps = sorted(self.model.values(), key=lambda m: m.time)
        probes = [t + d for m in self.rnd.sample(snaps, min(4, len(snaps)))
                  for t in [m.time] for d in (timedelta(0), timedelta(microseconds=-1), timedelta(microseconds=1))]
        os.environ["TZ"] = str(self.tz)  # set back by the fixture
        time.tzset()
        for m in self.rnd.sample(snaps, min(3, len(snaps))):
            local = m.time.astimezone(self.tz).replace(microsecond=0)
            naive = local.replace(tzinfo=None)
            probes.append(naive.isoformat() if naive.replace(tzinfo=self.tz) == local else local.isoformat())
        for t in probes:
            if isinstance(t, str):
                given = datetime.fromisoformat(t)
                until = (given if given.tzinfo else given.replace(tzinfo=self.tz)) + timedelta(seconds=1,
                                                                                               microseconds=-1)
            else:
                until = t
            before = [m for m in snaps if m.time <= until]
            if not before:
                continue
            newest = max(m.time for m in before)
            assert self.repo.snapshot("latest", until=t).id in {m.id for m in before if m.time == newest}, t

    def run(self, steps: int) -> None:
        ops = [(self.backup, 8), (self.forget_policy, 4), (self.forget_ids, 1), (self.forget_cli, 1),
               (self.prune, 2), (self.aggregate, 2), (self.rewrite, 1), (self.rehost, 1), (self.copy, 1),
               (self.export_import, 1)]
        for self.steps in range(steps):
            op = self.rnd.choices([o for o, _ in ops], [w for _, w in ops])[0] if len(self.model) >= 3 else self.backup
            op()
            self.verify(restore_all=self.rnd.random() < 0.3)
        self.verify(restore_all=True)
        self.verify2()

    def close(self) -> None:
        self.repo.close()
        self.repo2.close()


@pytest.fixture
def drill(tmp_path, monkeypatch):
    """``make(seed, url=None, **open_kw)``: a drill on a new repository (local by default)."""
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    zone = os.environ.get("TZ")  # the drill reads times in its zone: this process's is set back after it
    made = []

    def make(seed: int, url: str | None = None, **open_kw) -> Drill:
        work = tmp_path / f"d{seed}"
        work.mkdir()
        made.append(Drill(seed, url or str(work / "repo"), work, open_kw))
        return made[-1]

    yield make
    for d in made:
        d.close()
    if zone is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = zone
    time.tzset()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 35])
def test_random_histories_on_local_disk_keep_what_the_rules_say_and_restore_it(drill, seed):
    drill(seed).run(30)


@pytest.mark.slow
def test_a_random_history_over_the_backup_service(drill, http_server):  # noqa: F811 (the fixture)
    drill(100, http_server.url, token=FULL_TOKEN).run(20)
