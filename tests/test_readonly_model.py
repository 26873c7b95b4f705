"""The read-only commands against a model of a series of trees: each tree as the file system held it when backed
up (fulls and differentials, two sources, two hosts, tags, streams, forgets and aggregates in between), and what
`diff`, `find`, `ls`, `snapshots`, `stats` and a filtered `restore` must say of them."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crashkit
from chunkvault import Repository
from chunkvault.cli import main
from chunkvault.store.find import path_matcher

PASSWORD = crashkit.PASSWORD
NAMES = [b"a", b"b", b"c.txt", b"new\nline", b"back\\slash", b"\xff\xfe", b"st*r", b"q?", b"[br]",
         b"\xc3\xa9t\xc3\xa9", b"A", b"d", b"e.log", b" sp", b"-x"]
PATTERNS = ["*", "a", "*\\?*", "[[]br]", "*.txt", "st*", "A", "d/*", "*/*", "new\nline/*"]
AS_ROOT = os.geteuid() == 0


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def jcli(*args: str):
    rc, out, err = cli(args[0], "--json", *args[1:])
    assert rc == 0, (args, rc, err)
    return json.loads(out)


def named(d: dict, key: str = "path") -> bytes:
    return base64.b64decode(d[key + "_b64"]) if key + "_b64" in d else os.fsencode(d[key])


def capture(root: bytes) -> dict[bytes, tuple]:
    """path -> (type, mode, uid, gid, mtime_ns, size, content, target, xattrs): what a restore gives back; a
    hard link as the file it is."""
    out: dict[bytes, tuple] = {}

    def visit(rel: bytes) -> None:
        p = os.path.join(root, rel) if rel else root
        s = os.lstat(p)
        xattrs = tuple(sorted((os.fsencode(n), os.getxattr(p, n, follow_symlinks=False))
                              for n in os.listxattr(p, follow_symlinks=False)))
        head = (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime_ns)
        if stat.S_ISDIR(s.st_mode):
            out[rel] = ("dir", *head, 0, None, None, xattrs)
            for n in sorted(os.listdir(p)):
                visit(os.path.join(rel, n) if rel else n)
        elif stat.S_ISLNK(s.st_mode):
            t = os.readlink(p)
            out[rel] = ("symlink", *head, len(t), None, t, xattrs)
        else:
            data = open(p, "rb").read()
            out[rel] = ("file", *head, len(data), hashlib.sha256(data).digest(), None, xattrs)

    visit(b"")
    return out


def what_changed(old: tuple, new: tuple) -> str | None:
    if old[0] != new[0]:
        return "type"
    if old[5:8] != new[5:8]:
        return "content"
    return "metadata" if old != new else None


def expected_diff(a: dict, b: dict) -> dict[bytes, tuple[str, str | None]]:
    out: dict[bytes, tuple[str, str | None]] = {}
    for p in set(a) | set(b):
        if p not in b:
            out[p] = ("removed", None)
        elif p not in a:
            out[p] = ("added", None)
        elif what_changed(a[p], b[p]):
            out[p] = ("modified", what_changed(a[p], b[p]))
    return out


def rerooted(tree: dict, root: bytes) -> dict:
    return {(p[len(root) + 1:] if root else p) if p != root else b"": s for p, s in tree.items()
            if p == root or not root or p.startswith(root + b"/")}


class Model:
    """Two source trees changed at random and backed up; each snapshot with the tree it must hold."""

    def __init__(self, base, seed: int):
        self.rng = random.Random(seed)
        self.base = base
        self.url = str(base / "repo")
        self.repo = Repository.init(self.url, PASSWORD, kdf_seconds=0)
        self.srcs = [os.fsencode(base / f"src{i}") for i in range(2)]
        for s in self.srcs:
            os.mkdir(s)
        self.snaps: list[tuple[str, str, str, dict, list[str]]] = []  # id, source path, host, tree, tags
        self.clock = 1_600_000_000

    def when(self) -> int:
        self.clock += self.rng.randint(1, 5000)
        return self.clock * 10**9 + self.rng.randint(0, 10**9 - 1)

    def entries(self, root: bytes, kind: str | None = None) -> list[bytes]:
        out = []
        for dp, dns, fns in os.walk(root):
            for n in dns + fns:
                p = os.path.join(dp, n)
                if kind == "dir" and (os.path.islink(p) or not os.path.isdir(p)):
                    continue
                if kind == "file" and (os.path.islink(p) or not os.path.isfile(p)):
                    continue
                out.append(p)
        return out

    def new_path(self, root: bytes) -> bytes | None:
        d = self.rng.choice([root] + self.entries(root, "dir"))
        for _ in range(20):
            p = os.path.join(d, self.rng.choice(NAMES))
            if not os.path.lexists(p):
                return p
        return None

    def data(self) -> bytes:
        return b"" if self.rng.random() < 0.15 else self.rng.randbytes(self.rng.randint(1, 300))

    def change(self, root: bytes) -> None:
        """One change: added, modified in place (its mtime kept too), truncated, renamed, deleted, of another
        type, linked, unlinked, its attributes, mode, owner or mtime alone."""
        r = self.rng
        every, files = self.entries(root), self.entries(root, "file")
        linked = [p for p in files if os.lstat(p).st_nlink > 1]
        if linked and r.random() < 0.5:  # a file's other links see what their entries do not carry
            files = every = linked
        op = r.choice(["add", "add", "mkdir", "modify", "truncate", "rename", "delete", "retype", "link", "unlink",
                       "xattr", "chmod", "chown", "touch", "modify_keep_mtime"])
        if op in ("add", "mkdir") or not every:
            p = self.new_path(root)
            if p and op == "mkdir":
                os.mkdir(p)
            elif p:
                open(p, "wb").write(self.data())
                os.utime(p, ns=(self.when(), self.when()))
        elif op in ("modify", "modify_keep_mtime", "truncate") and files:
            p = r.choice(files)
            s = os.lstat(p)
            if op == "truncate":
                os.truncate(p, r.randint(0, s.st_size - 1) if s.st_size else 0)
            else:
                old = open(p, "rb").read()
                with open(p, "r+b") as f:  # in place: the inode, and its other links, stay
                    f.truncate(0)
                    f.write(bytes(b ^ 0x5A for b in old) if old and r.random() < 0.5 else self.data())
                if op == "modify_keep_mtime":
                    os.utime(p, ns=(s.st_atime_ns, s.st_mtime_ns))
        elif op == "rename":
            src, p = r.choice(every), self.new_path(root)
            if p and not (p + b"/").startswith(src + b"/"):
                os.rename(src, p)
        elif op in ("delete", "retype"):
            p = r.choice(every)
            was_dir = os.path.isdir(p) and not os.path.islink(p)
            shutil.rmtree(p) if was_dir else os.unlink(p)
            kind = r.choice(["file", "symlink"] if was_dir else ["dir", "symlink", "file"])
            if op == "retype" and kind == "file":
                open(p, "wb").write(self.data())
            elif op == "retype" and kind == "dir":
                os.mkdir(p)
            elif op == "retype":
                os.symlink(r.choice([b"a", b"../x", b"t\nn", b"\xff"]), p)
        elif op == "link" and files:
            src, p = r.choice(files), self.new_path(root)
            if p:
                os.link(src, p)
        elif op == "unlink":
            if linked:
                os.unlink(r.choice(linked))
        elif op in ("xattr", "chmod", "chown", "touch"):
            p = r.choice(every + [root] * (every is not linked))
            link = os.path.islink(p)
            if op == "xattr" and not link:
                names = os.listxattr(p)
                if names and r.random() < 0.4:
                    os.removexattr(p, r.choice(names))
                else:
                    os.setxattr(p, r.choice([b"user.a", b"user.b\xff", b"user.c"]), r.randbytes(r.randint(0, 8)))
            elif op == "chmod" and not link:
                os.chmod(p, r.choice([0o600, 0o644, 0o755, 0o700, 0o640]))
            elif op == "chown" and AS_ROOT:
                os.lchown(p, r.choice([0, 1000, 1001]), r.choice([0, 1000, 1001]))
            elif op == "touch":
                os.utime(p, ns=(self.when(), self.when()), follow_symlinks=False)

    def step(self) -> None:
        r = self.rng
        i = r.randrange(2)
        for _ in range(r.randint(1, 6)):
            self.change(self.srcs[i])
        host = r.choice(["h1", "h2"]) if r.random() < 0.3 else "h1"
        tags = r.choice([[], ["t1"], ["t1", "t2"], ["t2"]])
        tree = capture(self.srcs[i])
        snap = self.repo.backup([os.fsdecode(self.srcs[i])], kind=r.choice(["full", "diff", "auto", "auto"]),
                                host=host, tags=tags).snapshot
        self.snaps.append((snap.id, os.fsdecode(self.srcs[i]), host, tree, tags))
        if r.random() < 0.15:
            data = self.data()
            snap = self.repo.backup_stream(io.BytesIO(data), "dump.sql", host=host, tags=tags).snapshot
            self.snaps.append((snap.id, "dump.sql", host, {b"dump.sql": ("file", snap.id)}, tags))  # each new
        if r.random() < 0.15 and len(self.snaps) > 2:
            gone = r.choice(self.snaps)
            self.repo.forget([gone[0]])
            self.snaps.remove(gone)
        if r.random() < 0.1:
            diffs = [s for s in self.repo.snapshots() if s.parent]
            if diffs:
                self.repo.aggregate(r.choice(diffs).id)

    def expected_find(self, pattern: str, ignore_case: bool = False, keep=lambda snap: True) -> dict:
        """(host, paths, path) -> the snapshot ids of each version: one ends where the path is gone from the
        source's next snapshot, or is there otherwise."""
        match = path_matcher([pattern], ignore_case)
        out: dict[tuple, list[list[str]]] = {}
        last: dict[tuple, tuple] = {}
        before: dict[tuple, str] = {}
        for snap in self.snaps:
            sid, source, host, tree, tags = snap
            if not keep(snap):
                continue
            prev, before[host, source] = before.get((host, source)), sid
            for p, state in tree.items():
                if match(p):
                    key = (host, (source,), p)
                    versions = out.setdefault(key, [])
                    if versions and last[key] == (prev, state):
                        versions[-1].append(sid)
                    else:
                        versions.append([sid])
                    last[key] = (sid, state)
        return out


def found(*args: str) -> dict:
    return {(f["host"], tuple(f["paths"]), named(f)): [v["snapshots"] for v in f["versions"]] for f in jcli(*args)}


def check_diff(m: Model, a: tuple, b: tuple) -> None:
    got = {named(d): (d["change"], d["what"]) for d in jcli("diff", "-r", m.url, a[0], b[0])}
    assert got == expected_diff(a[3], b[3])
    rc, out, _ = cli("diff", "-r", m.url, a[0], b[0])
    marks = {"added": "+", "removed": "-", "content": "M", "type": "T", "metadata": "U"}
    assert sorted(line[0] for line in out.splitlines()[:-1]) == sorted(marks[w or c] for c, w in got.values())
    dirs_a = [p for p, s in a[3].items() if s[0] == "dir" and p]
    dirs_b = [p for p, s in b[3].items() if s[0] == "dir" and p]
    if dirs_a and dirs_b:  # one directory of each, compared as their roots
        x, y = m.rng.choice(dirs_a), m.rng.choice(dirs_b)
        got = {named(d): (d["change"], d["what"])
               for d in jcli("diff", "-r", m.url, f"{a[0]}:{os.fsdecode(x)}", f"{b[0]}:{os.fsdecode(y)}")}
        assert got == expected_diff(rerooted(a[3], x), rerooted(b[3], y))


def check_ls(m: Model, snap: tuple) -> None:
    sid, tree = snap[0], snap[3]
    listed = {named(e): e for e in jcli("ls", "-r", m.url, sid)}
    assert set(listed) == set(tree)
    for p, e in listed.items():
        s = tree[p]
        if s[0] == "file" and len(s) == 2:  # a stream
            continue
        assert (e["type"].replace("hardlink", "file"), int(e["mode"], 8), e["uid"], e["gid"], e["mtime_ns"]) == \
            (s[0], *s[1:5]), p
        assert e["type"] == "dir" or e["size"] == s[5], p
        if e["type"] != "hardlink":  # a link's entry names the file that holds them
            xattrs = ({base64.b64decode(k): base64.b64decode(v) for k, v in e["xattrs_b64"].items()}
                      if "xattrs_b64" in e else {os.fsencode(k): base64.b64decode(v) for k, v in e["xattrs"].items()})
            assert tuple(sorted(xattrs.items())) == s[8], p
    d = m.rng.choice([p for p, s in tree.items() if s[0] == "dir"] or [b""])
    shown = ["--", os.fsdecode(d)] if d else []
    got = {named(e) for e in jcli("ls", "-r", m.url, "--no-recursive", sid, *shown)}
    assert got == {p for p in tree if p == d or (p and p != d and p.rpartition(b"/")[0] == d)} if d else \
        {p for p in tree if b"/" not in p}
    assert {named(e) for e in jcli("ls", "-r", m.url, sid, *shown)} == set(rerooted(tree, d)) if not d else \
        {p for p in tree if p == d or p.startswith(d + b"/")}
    assert {named(e) for e in jcli("ls", "-r", m.url, f"{sid}:{os.fsdecode(d) or '/'}")} == set(rerooted(tree, d))


def check_restore_selects(m: Model, snap: tuple) -> None:
    """restore --include/--exclude writes what they select, with the directories above it."""
    sid, tree = snap[0], snap[3]
    include = m.rng.choice([[], ["*.txt"], ["a"], ["[[]br]"], ["*\\?"], ["d/*"]])
    exclude = m.rng.choice([[], ["*.log"], ["b*"], ["st\\*r"]])
    target = m.base / f"restored-{sid[:12]}-{m.rng.random()}"
    args = [a for g in include for a in ("--include", g)] + [a for g in exclude for a in ("--exclude", g)]
    assert cli("restore", "-r", m.url, sid, "--target", str(target), "-q", *args)[0] == 0
    inc, exc = path_matcher(include), path_matcher(exclude)

    def within(p: bytes, match) -> bool:
        parts = p.split(b"/")
        return any(match(b"/".join(parts[:k])) for k in range(1, len(parts) + 1))

    chosen = {p for p in tree if p and (not include or within(p, inc)) and not (exclude and within(p, exc))}
    chosen |= {b"/".join(p.split(b"/")[:k]) for p in chosen for k in range(1, p.count(b"/") + 1)} | {b""}
    if include and chosen == {b""}:  # nothing matched: nothing restored, a warning says so
        return
    assert set(capture(os.fsencode(target))) == chosen
    shutil.rmtree(target)


def check_latest(m: Model) -> None:
    listed = jcli("snapshots", "-r", m.url)
    for n in (1, 2):
        for group_by in (None, "host", "paths", "tags", "host,tags"):
            args = ["--latest", str(n)] + (["--group-by", group_by] if group_by else [])
            groups: dict[tuple, list] = {}
            for d in listed:
                key = tuple(tuple(sorted(d[f])) if isinstance(d[f], list) else d[f]
                            for f in (group_by or "host,paths").split(","))
                groups.setdefault(key, []).append(d)
            newest = {d["id"] for g in groups.values() for d in sorted(g, key=lambda d: d["time"])[-n:]}
            assert {d["id"] for d in jcli("snapshots", "-r", m.url, *args)} == newest, args
    for d in listed:  # each snapshot's size and count of files: every entry but a directory
        tree = next(s[3] for s in m.snaps if s[0] == d["id"])
        assert d["files"] == sum(1 for s in tree.values() if s[0] != "dir")
        if len(next(iter(tree.values()))) > 2:
            assert d["size"] <= sum(s[5] for s in tree.values() if s[0] == "file")


def model(tmp_path_factory, seed: int, steps: int = 9) -> Model:
    m = Model(tmp_path_factory.mktemp("model"), seed)
    for _ in range(steps):
        m.step()
    return m


@pytest.fixture
def password_set(monkeypatch):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    monkeypatch.delenv("CHUNKVAULT_HOST", raising=False)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_diff_find_ls_and_restore_say_what_the_trees_held(tmp_path_factory, password_set, seed):
    m = model(tmp_path_factory, seed)
    for snap in m.snaps:
        check_ls(m, snap)
        if snap[1] != "dump.sql":
            check_restore_selects(m, snap)
    trees = [s for s in m.snaps if s[1] != "dump.sql"]
    for _ in range(6):
        a, b = m.rng.choice(trees), m.rng.choice(trees)
        check_diff(m, a, b)
    for pattern in PATTERNS:
        assert found("find", "-r", m.url, pattern) == m.expected_find(pattern)
        assert found("find", "-r", m.url, pattern, "-i") == m.expected_find(pattern, ignore_case=True)
    for flag, value, keep in (("--host", "h2", lambda s: s[2] == "h2"), ("--tag", "t2", lambda s: "t2" in s[4]),
                              ("--tag", "t1,t2", lambda s: {"t1", "t2"} <= set(s[4]))):
        assert found("find", "-r", m.url, "*", flag, value) == m.expected_find("*", keep=keep)
    check_latest(m)


def stored(url: str) -> int:
    return Repository.open(url, PASSWORD, ledger=False).stats().blob_stored_bytes


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), how=st.sampled_from(["snapshot", "tag", "host"]))
def test_what_stats_says_only_a_selection_needs_is_what_forget_and_prune_free(tmp_path_factory, password_set,
                                                                             seed, how):
    """The data only the selection needs, exactly: done on a copy, after a prune of what was unused before."""
    m = model(tmp_path_factory, seed)
    sid = m.rng.choice(m.snaps)[0]
    selection = {"snapshot": [sid], "tag": ["--tag", "t2"], "host": ["--host", "h2"]}[how]
    rc, out, err = cli("stats", "-r", m.url, *selection, "--json")
    if rc != 0:
        assert "no snapshot matches" in err
        return
    only = json.loads(out)["only"]["stored_bytes"]
    copy = str(m.base / "copy")
    shutil.copytree(m.url, copy)
    repo = Repository.open(copy, PASSWORD, ledger=False)
    repo.prune(max_unused=0)
    before = stored(copy)
    ids = {"snapshot": [sid], "tag": [s.id for s in repo.snapshots(tags=["t2"])],
           "host": [s.id for s in repo.snapshots(hosts=["h2"])]}[how]
    repo = Repository.open(copy, PASSWORD, ledger=False)
    repo.forget(ids)
    repo.prune(max_unused=0)
    assert before - stored(copy) == only
