"""rewrite --new-host: a renamed machine keeps its chain (its next backup builds on it, retention sees one group)."""
from __future__ import annotations

import json
import os
import warnings

import pytest
from hypothesis import given, strategies as st

import crashkit
from chunkvault import Repository
from chunkvault.errors import RollbackDetected, UsageError
from chunkvault.ledger import RepositoryStateWarning
from chunkvault.store.retention import RetentionPolicy
from chunkvault.store.rewrite import FORMER_HOSTS, plan_rehost
from chunkvault.store.snapshot import KIND_DIFF, KIND_FULL, Snapshot


def snap(sid: str, host: str, parent: str | None = None) -> Snapshot:
    return Snapshot(time="2026-01-01T00:00:00+00:00", kind=KIND_DIFF if parent else KIND_FULL, parent=parent,
                    host=host, paths=["/d"], id=sid * 8)


def test_a_selection_that_parts_a_chain_is_refused_either_way():
    full, diff, other = snap("a", "old"), snap("b", "old", "a" * 8), snap("c", "old")
    every = [full, diff, other]
    with pytest.raises(UsageError, match="bbbbbbbb is built on aaaaaaaa, both of host old, and aaaaaaaa is not "
                                         "selected: a chain keeps one host"):
        plan_rehost(every, [diff], "new")  # a differential alone
    with pytest.raises(UsageError, match="and bbbbbbbb is not selected"):
        plan_rehost(every, [full, other], "new")  # a full without its differential
    assert plan_rehost(every, [full, diff], "new") == [full, diff]  # a whole chain; the other chain stays


def test_a_chain_whose_hosts_differ_already_is_mended_piecewise():
    """A rename killed part-way (or `backup --parent` across hosts): the rest is renamed, not refused."""
    full, diff, newer = snap("a", "new"), snap("b", "old", "a" * 8), snap("c", "old", "b" * 8)
    assert plan_rehost([full, diff, newer], [diff, newer], "new") == [diff, newer]
    assert plan_rehost([full, diff, newer], [full], "new") == []  # has it already: nothing to write


@st.composite
def forests(draw):
    n = draw(st.integers(1, 9))
    snaps: list[Snapshot] = []
    for i in range(n):
        parent = draw(st.sampled_from([None, *(s.id for s in snaps)]))
        snaps.append(snap(chr(97 + i), draw(st.sampled_from(["old", "new", "x"])), parent))
    picked = draw(st.lists(st.sampled_from(snaps), unique_by=lambda s: s.id))
    return snaps, picked


@given(forests())
def test_a_rename_never_parts_what_shared_a_host_and_renames_only_the_selected(drawn):
    every, picked = drawn
    by_id = {s.id: s for s in every}
    try:
        plan = plan_rehost(every, picked, "new")
    except UsageError:
        after = {s.id: "new" if s in picked else s.host for s in every}
        assert any(s.parent and s.host == by_id[s.parent].host and after[s.id] != after[s.parent] for s in every)
        return
    assert plan == [s for s in picked if s.host != "new"]
    after = {s.id: "new" if s in picked else s.host for s in every}
    for s in every:
        if s.parent and s.host == by_id[s.parent].host:
            assert after[s.id] == after[s.parent]


def chain(tmp_path, repo: Repository, host: str = "old") -> tuple[str, list[str]]:
    """A full and two small differentials of ``host`` (a backup of ``--type auto`` after them is a differential);
    (source directory, their ids)."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    ids = []
    for n, kind in enumerate(["full", "diff", "diff"]):
        (src / f"f{n}").write_bytes(os.urandom(300 if n else 30_000))
        ids.append(repo.backup([str(src)], kind=kind, host=host).snapshot.id)
    return str(src), ids


def test_a_renamed_chain_is_the_parent_of_the_new_host_s_backup_and_one_retention_group(tmp_path, new_repo):
    repo = new_repo()
    src, ids = chain(tmp_path, repo)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    elsewhere = repo.backup([str(other)], host="old").snapshot.id  # another source of the old host
    before = {s.id: s for s in repo.snapshots()}
    trees = {sid: [e.path for e in repo.tree(sid)] for sid in ids}
    dry = repo.rewrite(None, paths=[src], hosts=["old"], new_host="new")
    assert dry.dry_run and dry.rewritten == ids and dry.renamed == [(sid, "old") for sid in ids]
    assert {s.host for s in repo.snapshots()} == {"old"}
    done = repo.rewrite(paths=[src], hosts=["old"], new_host="new", dry_run=False)
    assert not done.dry_run and done.rewritten == ids
    after = {s.id: s for s in repo.snapshots()}
    assert [after[sid].host for sid in ids] == ["new"] * 3 and after[elsewhere].host == "old"
    for sid in ids:  # the objects only: manifests and chains as they were
        assert (after[sid].manifest, after[sid].parent, after[sid].time) == (before[sid].manifest,
                                                                                  before[sid].parent, before[sid].time)
        assert after[sid].stats[FORMER_HOSTS] == ["old"] and [e.path for e in repo.tree(sid)] == trees[sid]
    (tmp_path / "src" / "f9").write_text("new")
    result = repo.backup([src], host="new")
    assert result.snapshot.kind == "diff" and result.snapshot.parent == ids[-1]
    plan = repo.forget(policy=RetentionPolicy(keep_last=1), dry_run=True)
    assert sorted(plan.remove) == sorted(ids)  # one group of the new host's source: only its newest kept
    again = repo.rewrite(hosts=["new"], new_host="new", dry_run=False)
    assert again.rewritten == [] and repo.check().ok


def test_a_rename_onto_a_host_with_snapshots_of_the_same_paths_says_it_joins_them(tmp_path, new_repo):
    """Two machines merged by mistake show before --confirm: from then on one series, one parent."""
    repo = new_repo()
    src, ids = chain(tmp_path, repo)
    theirs = repo.backup([src], host="new", kind="full").snapshot.id
    other = tmp_path / "other"
    other.mkdir()
    repo.backup([str(other)], host="new")  # another source of that host: not joined
    dry = repo.rewrite(hosts=["old"], new_host="new")
    assert dry.rewritten == ids and dry.joined == [theirs]
    assert repo.rewrite(hosts=["old"], new_host="new", dry_run=False).joined == [theirs]
    assert repo.backup([src], host="new", kind="diff").snapshot.parent == theirs  # the newest of them all


def test_a_rename_of_part_of_a_chain_changes_nothing(tmp_path, new_repo):
    repo = new_repo()
    _, ids = chain(tmp_path, repo)
    for named in ([ids[1]], [ids[0]], ids[:2]):
        with pytest.raises(UsageError, match="a chain keeps one host"):
            repo.rewrite(snapshots=named, new_host="new", dry_run=False)
    assert {s.host for s in repo.snapshots()} == {"old"}


@pytest.mark.parametrize("kwargs, said", [
    (dict(new_host="new"), "never every snapshot by default"),
    (dict(new_host="new", hosts=["old"], excludes=["f0"]), "not both at once"),
    (dict(new_host="new", hosts=["old"], iexcludes=["F0"]), "not both at once"),
    (dict(new_host="", hosts=["old"]), "host must be a non-empty string"),
    (dict(new_host=7, hosts=["old"]), "host must be a non-empty string"),
    (dict(new_host="a\nb", hosts=["old"]), "one line of text"),
])
def test_bad_rename_arguments_are_usage_errors(tmp_path, new_repo, kwargs, said):
    repo = new_repo()
    chain(tmp_path, repo)
    with pytest.raises(UsageError, match=said):
        repo.rewrite(dry_run=False, **kwargs)
    assert {s.host for s in repo.snapshots()} == {"old"}


def test_the_ledger_takes_a_rename_for_a_rewrite_and_the_old_object_put_back_for_an_old_version(tmp_path):
    path = str(tmp_path / "repo")
    crashkit.init_repo(path)
    with crashkit.open_repo(path) as repo:
        src, ids = chain(tmp_path, repo)
    raw = {sid: open(os.path.join(path, "snapshots", sid), "rb").read() for sid in ids}
    with crashkit.open_repo(path) as repo:
        repo.rewrite(hosts=["old"], new_host="new", dry_run=False)
    with crashkit.open_repo(path) as repo, warnings.catch_warnings():
        warnings.simplefilter("error", RepositoryStateWarning)
        assert [p.problem for p in repo.check().problems] == []
        assert repo.snapshot("latest").host == "new"  # the newest seen is still there: not rolled back
        assert repo.backup([src], host="new").snapshot.parent == ids[-1]
    crashkit.put_snapshot_back(path, ids[-1], raw)  # the object as it was before the rename
    with crashkit.open_repo(path) as repo:
        with pytest.raises(RollbackDetected, match=f"{ids[-1]} is stored as it was before a change"):
            repo.backup([src], host="old")


def test_a_repository_object_open_across_the_rename_sees_the_new_host(tmp_path):
    """Another client's listing (and the local cache of snapshot objects) must not serve the old object."""
    path = str(tmp_path / "repo")
    crashkit.init_repo(path)
    with crashkit.open_repo(path) as reader, crashkit.open_repo(path, ledger=str(tmp_path / "l2")) as writer:
        src, ids = chain(tmp_path, writer)
        assert {s.host for s in reader.snapshots()} == {"old"}
        writer.rewrite(hosts=["old"], new_host="olD", dry_run=False)
        assert {s.host for s in reader.snapshots()} == {"olD"}
        assert reader.backup([src], host="olD").snapshot.parent == ids[-1]


def test_a_copy_of_a_renamed_chain_to_a_repository_holding_it_is_not_sent_again_and_is_said(tmp_path, new_repo,
                                                                                            cli):
    src_repo = new_repo(str(tmp_path / "src-repo"))
    src, ids = chain(tmp_path, src_repo)
    dst = Repository.init(str(tmp_path / "dst"), "other password", kdf_seconds=0, copy_chunker_from=src_repo)
    first = src_repo.copy_to(dst)
    assert [a for a, _ in first.copied] == ids and first.other_host == []
    src_repo.rewrite(hosts=["old"], new_host="new", dry_run=False)
    (tmp_path / "src" / "f9").write_text("after the rename")
    newest = src_repo.backup([src], host="new").snapshot
    again = src_repo.copy_to(dst)
    copies = dict(first.copied)
    assert again.skipped == ids and [a for a, _ in again.copied] == [newest.id]  # no second chain
    assert again.other_host == [(sid, copies[sid], "old") for sid in ids]
    (_, newest_copy), = again.copied
    assert dst.snapshot(newest_copy).parent == copies[ids[-1]] and len(dst.snapshots()) == 4
    proc = cli("copy", "-r", str(tmp_path / "src-repo"), "--to", str(tmp_path / "dst"), "--json",
               env={"CHUNKVAULT_TO_PASSWORD": "other password"})
    out = json.loads(proc.stdout)
    assert out["copied"] == [] and out["other_host"] == [
        {"source": sid, "destination": copies[sid], "host": "old"} for sid in ids]
    assert proc.stderr.decode() == ("warning: 3 snapshot(s) already there have another host there (old): renamed on "
                                    "one side since they were copied; `rewrite --new-host` them there too, or "
                                    "backups and retention see their chains apart\n")
    dst.rewrite(hosts=["old"], new_host="new", dry_run=False)  # as the warning says
    assert {s.host for s in dst.snapshots()} == {"new"} and src_repo.copy_to(dst).other_host == []


def test_rewrite_new_host_on_the_command_line(tmp_path):
    repo = str(tmp_path / "repo")
    crashkit.init_repo(repo)
    src = tmp_path / "src"
    src.mkdir()
    for kind in ("full", "diff"):
        (src / kind).write_bytes(os.urandom(30_000 if kind == "full" else 100))
        crashkit.run_cli("backup", "-r", repo, str(src), "--host", "old", "--type", kind, "-q")
    cli = crashkit.run_cli
    listed = json.loads(cli("snapshots", "-r", repo, "--json").stdout)
    ids = [s["id"] for s in listed]
    out = cli("rewrite", "-r", repo, "--host", "old", "--new-host", "new").stdout.decode().splitlines()
    assert out == [f"would rename {sid[:8]}: host old -> new" for sid in ids] + [
        "nothing changed: add --confirm REWRITE to give these 2 snapshot(s) host new"]
    assert {s["host"] for s in json.loads(cli("snapshots", "-r", repo, "--json").stdout)} == {"old"}
    for args, said in [([], "renames only snapshots selected by host, tag, path or name, never every snapshot by "
                             "default (--host OLD, --tag, --path, or ids)"),
                       (["--host", "old", "--exclude", "full"], "not both at once"),
                       ([ids[1][:8]], f"{ids[1][:8]} is built on {ids[0][:8]}, both of host old, and {ids[0][:8]} "
                                      "is not selected: a chain keeps one host, select all of it (--host old, or "
                                      "name each of its snapshots)")]:
        proc = cli("rewrite", "-r", repo, "--new-host", "new", "--confirm", "REWRITE", *args, ok=(2,))
        err = proc.stderr.decode()
        assert said in err and len(err.splitlines()) == 1 and "Traceback" not in err
    done = json.loads(cli("rewrite", "-r", repo, "--host", "old", "--new-host", "new", "--confirm", "REWRITE",
                          "--json").stdout)
    assert done == {"dry_run": False, "rewritten": ids, "inherited": [], "recounted": [], "removed": [], "new_host": "new",
                    "renamed": [{"snapshot": sid, "host": "old"} for sid in ids], "joined": []}
    listed = json.loads(cli("snapshots", "-r", repo, "--json", "--host", "new").stdout)
    assert [(s["id"], s["stats"][FORMER_HOSTS]) for s in listed] == [(sid, ["old"]) for sid in ids]
    (src / "more").write_text("more")
    mine = json.loads(cli("backup", "-r", repo, str(src), "--host", "mine", "--type", "full", "--json").stdout)["id"]
    said = cli("rewrite", "-r", repo, "--host", "mine", "--new-host", "new").stdout.decode().splitlines()
    assert said[-1] == ("they would join 2 snapshot(s) host new has of the same paths: its next backup builds on the "
                        "newest of them all")
    cli("forget", "-r", repo, mine)
    saved = json.loads(cli("backup", "-r", repo, str(src), "--host", "new", "--json").stdout)
    assert saved["type"] == "diff" and saved["parent"] == ids[-1]
