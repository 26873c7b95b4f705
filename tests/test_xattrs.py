"""Extended attributes: recorded by backups, set by restores, compared by verification, shown by mount."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct

import pytest
from hypothesis import given, strategies as st

from chunkvault import Repository
from chunkvault.errors import CorruptObject, UnsupportedFormat
from chunkvault.store import config as config_module
from chunkvault.store import xattrs as xattrs_mod
from chunkvault.store.crypto import Sealer
from chunkvault.store.manifest import T_HARDLINK
from chunkvault.store.snapshot import SNAPSHOT_VERSION, Snapshot
from chunkvault.store.xattrs import decode_xattrs, encode_xattrs
from chunkvault.verify import compare_tree
from conftest import PASSWORD
from servers_http import APPEND_TOKEN, FULL_TOKEN, http_server, serve_factory  # noqa: F401
from treeutil import settle

ROOT = os.geteuid() == 0
# security.capability of cap_net_raw+ep (revision 2): what `setcap cap_net_raw+ep` writes.
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)

names = st.binary(min_size=1, max_size=40).map(lambda b: b"user." + b)
sets = st.dictionaries(names, st.binary(max_size=300), max_size=6)


@given(sets, st.randoms())
def test_the_encoding_round_trips_and_depends_only_on_the_set(pairs, rnd):
    shuffled = list(pairs.items())
    rnd.shuffle(shuffled)
    raw = encode_xattrs(pairs)
    assert raw == encode_xattrs(dict(shuffled))
    assert decode_xattrs(raw) == pairs
    assert (raw == b"") == (not pairs)


@pytest.mark.parametrize("raw, why", [
    (b"\x05\x01\x00\x00", "inside a header"),
    (struct.pack("<BI", 6, 9) + b"user.a" + b"short", "past its record"),
    (struct.pack("<BI", 0, 0), "past its record"),
    (struct.pack("<BI", 6, 0) + b"user.b" + struct.pack("<BI", 6, 0) + b"user.a", "out of order"),
    (struct.pack("<BI", 6, 0) + b"user.a" + struct.pack("<BI", 6, 0) + b"user.a", "out of order"),
])
def test_malformed_sets_are_refused(raw, why):
    with pytest.raises(ValueError, match=why):
        decode_xattrs(raw)


def xattrs_of(root) -> dict[bytes, dict[bytes, bytes]]:
    """Relative path -> its extended attributes (symbolic links not followed), for every path under root."""
    root = os.fsencode(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = {
                os.fsencode(n): os.getxattr(full, n, follow_symlinks=False)
                for n in os.listxattr(full, follow_symlinks=False)}
    return out


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "app.conf").write_text("port = 6362\n")
    (src / "plain.txt").write_text("no attributes\n")
    (src / "big.bin").write_bytes(os.urandom(300_000))
    (src / "link").symlink_to("etc/app.conf")
    os.link(src / "big.bin", src / "big-link.bin")
    try:
        os.setxattr(src / "etc" / "app.conf", "user.origin", b"config management")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip("the test directory's file system keeps no user extended attributes")
        raise
    os.setxattr(src / "etc" / "app.conf", "user.binary", bytes(range(256)))
    os.setxattr(src / "etc", "user.dir", b"")
    os.setxattr(src / "big.bin", "user.checked", b"2026-11-30")
    if ROOT:
        os.setxattr(src / "big.bin", "security.capability", CAP_NET_RAW)
        os.setxattr(src / "link", "trusted.link", b"on the link itself", follow_symlinks=False)
    return src


@pytest.fixture
def repo(new_repo):
    return new_repo()


def test_backup_and_restore_keep_them(repo, source, tmp_path):
    snap = repo.backup([str(source)]).snapshot
    assert snap.version == SNAPSHOT_VERSION
    entries = {e.path: e for e in repo.tree(snap)}
    assert decode_xattrs(entries[b"etc/app.conf"].xattrs) == {
        b"user.binary": bytes(range(256)), b"user.origin": b"config management"}
    assert entries[b"plain.txt"].xattrs == b""
    assert entries[b"big.bin"].type == T_HARDLINK and entries[b"big.bin"].xattrs == b""  # its first link has them
    assert b"user.checked" in decode_xattrs(entries[b"big-link.bin"].xattrs)
    out = tmp_path / "out"
    repo.restore(snap, str(out), verify=True)
    assert xattrs_of(out) == xattrs_of(source)
    if ROOT:  # set after the owner: a chown clears file capabilities
        assert os.getxattr(out / "big.bin", "security.capability") == CAP_NET_RAW


def test_a_change_of_attributes_alone_makes_a_differential(repo, source, tmp_path):
    settle()
    first = repo.backup([str(source)]).snapshot
    before = xattrs_of(source)
    assert repo.backup([str(source)], skip_if_unchanged=True).skipped  # kept from the parent, not seen as changes
    os.setxattr(source / "plain.txt", "user.new", b"1")
    os.removexattr(source / "etc", "user.dir")
    second = repo.backup([str(source)]).snapshot
    assert second.kind == "diff" and second.stats["manifest_records"] == 2
    assert [(kind, a.path, a.xattrs, b.xattrs) for kind, a, b in repo.diff(first, second)] == [
        ("modified", b"etc", encode_xattrs({b"user.dir": b""}), b""),
        ("modified", b"plain.txt", b"", encode_xattrs({b"user.new": b"1"}))]
    for snap, want in ((first, before), (second, xattrs_of(source))):
        out = tmp_path / f"out-{snap.short_id}"
        repo.restore(snap, str(out))
        assert xattrs_of(out) == want


def test_without_attributes_a_snapshot_stays_version_1_and_none_are_set(repo, source, tmp_path):
    bare = repo.backup([str(source)], xattrs=False).snapshot
    assert bare.version == 1 and all(not e.xattrs for e in repo.tree(bare))
    full = repo.backup([str(source)], kind="full").snapshot
    out = tmp_path / "out"
    repo.restore(full, str(out), xattrs=False, verify=True)
    assert all(not attrs for attrs in xattrs_of(out).values())


def test_a_parent_taken_under_the_other_rule_is_not_trusted_for_them(repo, source):
    """After a backup without attributes (or by a chunkvault that kept none), unchanged files get theirs
    read, their data still not; and the other way round a backup without them keeps none of the parent's."""
    settle()
    repo.backup([str(source)], xattrs=False)
    with_them = repo.backup([str(source)])
    snap = with_them.snapshot
    # changed by their attributes alone (the link has one as root)
    assert snap.kind == "diff" and snap.stats["read_bytes"] == 0 and snap.stats["changed_files"] == 2 + ROOT
    assert {e.path: decode_xattrs(e.xattrs) for e in repo.tree(snap) if e.xattrs} == {
        path: attrs for path, attrs in xattrs_of(source).items() if attrs and path != b"big.bin"}
    assert repo.backup([str(source)], skip_if_unchanged=True).skipped  # and from then on taken unseen
    without = repo.backup([str(source)], xattrs=False).snapshot
    assert without.version == 1 and not any(e.xattrs for e in repo.tree(without))


def test_a_restore_in_place_removes_attributes_the_snapshot_lacks(repo, source, tmp_path):
    snap = repo.backup([str(source)]).snapshot
    out = tmp_path / "out"
    repo.restore(snap, str(out))
    os.setxattr(out / "plain.txt", "user.stray", b"x")
    os.setxattr(out / "etc" / "app.conf", "user.origin", b"edited")
    repo.restore(snap, str(out), force=True, delta=True)
    assert xattrs_of(out) == xattrs_of(source)


def test_verification_names_an_attribute_that_differs(repo, source, tmp_path):
    snap = repo.backup([str(source)]).snapshot
    out = tmp_path / "out"
    repo.restore(snap, str(out))
    os.removexattr(out / "etc" / "app.conf", "user.origin")
    os.setxattr(out / "plain.txt", "user.extra", b"x")
    found = compare_tree((e for e in repo.tree(snap)), out)
    assert sorted((m.path, m.kind, m.expected, m.actual) for m in found.mismatches) == [
        ("etc/app.conf", "xattrs", "user.origin", "user.origin: missing"),
        ("plain.txt", "xattrs", "none", "user.extra: not in the snapshot")]
    assert not compare_tree((e for e in repo.tree(snap)), out, xattrs=False).mismatches


def test_attributes_that_cannot_be_read_are_a_warning(repo, source, monkeypatch):
    real = os.listxattr

    def refuse(target, *args, **kwargs):
        if isinstance(target, bytes) and target.endswith(b"etc") or isinstance(target, int):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(target, *args, **kwargs)

    monkeypatch.setattr(xattrs_mod.os, "listxattr", refuse)
    result = repo.backup([str(source)])
    entries = {e.path: e for e in repo.tree(result.snapshot)}
    assert entries[b"etc"].xattrs == b"" and entries[b"big.bin"].xattrs == b""  # read through its open fd
    assert entries[b"etc/app.conf"].xattrs  # read by path: a small file
    warned = [w for w in result.warnings if "cannot read extended attributes" in w]
    assert len(warned) == 2 and any(w.endswith("etc: Permission denied") for w in warned)


def test_attributes_that_cannot_be_read_keep_the_parents_and_are_read_again(repo, source, monkeypatch, cli,
                                                                          tmp_path):
    """An error reading them (EIO, EACCES) is the path's unreadable (exit 3), not a silent loss: the entry keeps
    the parent's attributes, and the next backup reads them again, even where its stat says unchanged (they
    were taken from the parent on its change time, so that one error dropped an ACL from every later one)."""
    real = os.listxattr
    failing = [True]

    def refuse(target, *args, **kwargs):
        if failing[0] and (isinstance(target, bytes) and target.endswith(b"etc") or isinstance(target, int)):
            raise OSError(errno.EIO, "Input/output error")
        return real(target, *args, **kwargs)

    monkeypatch.setattr(xattrs_mod.os, "listxattr", refuse)
    settle()  # their times out of the racy margin: only the flag has the next backup read them again
    first = repo.backup([str(source)])
    assert first.partial and sorted(first.snapshot.stats["unreadable"]) == ["big-link.bin", "etc"]
    ls = cli("ls", "-r", str(tmp_path / "repo0"), "latest", "--json")  # the repo fixture's
    listed = {e["path"]: e["unreadable"] for e in json.loads(ls.stdout)}
    assert listed["etc"] == listed["big-link.bin"] == "attributes" and listed["plain.txt"] is None
    failing[0] = False
    second = repo.backup([str(source)])
    assert not second.partial
    entries = {e.path: e for e in repo.tree(second.snapshot)}
    assert decode_xattrs(entries[b"etc"].xattrs) == {b"user.dir": b""}
    assert b"user.checked" in decode_xattrs(entries[b"big-link.bin"].xattrs)  # the first link holds the file
    os.chmod(source / "etc", 0o755)  # its change time moves: the attributes are read, and fail again
    failing[0] = True
    third = repo.backup([str(source)])
    assert third.partial and third.snapshot.stats["unreadable"] == ["etc"]
    assert {e.path: e for e in repo.tree(third.snapshot)}[b"etc"].xattrs == entries[b"etc"].xattrs


def test_an_attribute_removed_between_the_listing_and_its_read_costs_only_itself(repo, source, monkeypatch):
    """Another program removed one attribute after the backup listed them: the file keeps the others (its
    ACLs and capabilities among them), with no warning, rather than losing them all."""
    real = os.getxattr

    def racing(target, name, *args, **kwargs):
        if name == "user.binary":
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        return real(target, name, *args, **kwargs)

    monkeypatch.setattr(xattrs_mod.os, "getxattr", racing)
    result = repo.backup([str(source)])
    entries = {e.path: e for e in repo.tree(result.snapshot)}
    assert decode_xattrs(entries[b"etc/app.conf"].xattrs) == {b"user.origin": b"config management"}
    assert not [w for w in result.warnings if "extended attributes" in w]


def test_attributes_a_target_cannot_take_are_a_warning(repo, source, tmp_path, monkeypatch):
    """Refused one by one (EPERM: user.* on an immutable file, say), each entry's are named; refused by the
    file system, which keeps none (ENOTSUP), one warning counts the entries."""
    snap = repo.backup([str(source)]).snapshot

    def refused(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(xattrs_mod.os, "setxattr", refused)
    out = tmp_path / "out"
    result = repo.restore(snap, str(out), processes=1)
    assert (out / "etc" / "app.conf").read_text() == "port = 6362\n"
    warned = [w for w in result.warnings if "extended attributes" in w]
    assert any("etc/app.conf: user.binary: Operation not permitted; user.origin" in w for w in warned)
    assert len(warned) == 3 + ROOT  # app.conf, etc, big-link.bin (and, as root, the link)

    def unsupported(*args, **kwargs):
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(xattrs_mod.os, "setxattr", unsupported)
    result = repo.restore(snap, str(tmp_path / "out2"), processes=1)
    warned = [w for w in result.warnings if "extended attributes" in w]
    assert len(warned) == 1 and warned[0].startswith(f"extended attributes not set on {3 + ROOT} entries: the "
                                                     "target's file system does not support them (")
    assert "user.binary" in warned[0] and "etc/app.conf" in warned[0]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("processes", ["1", "2"])
def test_attributes_of_a_namespace_this_user_may_not_write_are_one_warning(cli, tmp_path, processes):
    """trusted.* (security.* likewise) without CAP_SYS_ADMIN, as for a restore as another user than root: a
    warning per entry, a line for each file of a tree whose every file has a SELinux label."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i:02}").write_bytes(b"%d" % i)
        os.setxattr(src / f"f{i:02}", "trusted.origin", b"here")
    os.setxattr(src / "f00", "user.kept", b"set")
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, str(src))
    out = tmp_path / "out"
    proc = cli("restore", "-r", repo, "latest", "--target", str(out), "--processes", processes, "--json",
               wrap=["setpriv", "--bounding-set", "-sys_admin"])
    result = json.loads(proc.stdout)
    assert result["processes"] == int(processes)
    warned = [w for w in result["warnings"] if "extended attributes" in w]
    assert warned == ["extended attributes left as they were on 12 entries: setting or removing them is not "
                      "permitted to this user (trusted.origin): f00, f01, f02, f03, f04 and 7 more"]
    assert os.getxattr(out / "f00", "user.kept") == b"set" and (out / "f11").read_bytes() == b"11"


def test_mount_lists_and_reads_them(repo, source):
    from chunkvault.mount import SnapshotFS
    from chunkvault.mountview import Layout

    snap = repo.backup([str(source)]).snapshot
    fs = SnapshotFS(repo)
    root = f"/snapshots/{Layout([snap]).names[snap.id]}"
    assert sorted(fs.listxattr(f"{root}/etc/app.conf")) == ["user.binary", "user.origin"]
    assert fs.getxattr(f"{root}/etc/app.conf", "user.origin") == b"config management"
    assert fs.getxattr(f"{root}/big-link.bin", "user.checked") == b"2026-11-30"  # a hard link reads as its file
    assert fs.listxattr(f"{root}/plain.txt") == [] and fs.listxattr("/snapshots") == []
    with pytest.raises(OSError) as exc:
        fs.getxattr(f"{root}/plain.txt", "user.origin")
    assert exc.value.errno == errno.ENODATA


def test_copy_export_and_import_keep_them(repo, new_repo, source, tmp_path):
    snap = repo.backup([str(source)]).snapshot
    other = new_repo()
    repo.copy_to(other)
    path = str(tmp_path / "one.backup")
    repo.export(snap, path, "export password", kdf_seconds=0)
    third = new_repo()
    imported = third.import_backup(path, "export password").snapshot
    for r, s in ((other, other.snapshot()), (third, imported)):
        assert s.version == SNAPSHOT_VERSION
        out = tmp_path / f"out-{s.short_id}"
        r.restore(s, str(out))
        assert xattrs_of(out) == xattrs_of(source)


@pytest.mark.parametrize("how", ["aggregate", "forget the full"])
def test_a_differential_made_whole_takes_the_version_its_records_need(repo, source, tmp_path, how):
    """A differential that changes no attribute is version 1; merged with its full (aggregate, or the
    rebase a forget makes) its manifest carries the full's attributes, and its version says so."""
    full = repo.backup([str(source)]).snapshot
    (source / "plain.txt").write_text("changed\n")
    diff = repo.backup([str(source)]).snapshot
    assert (full.version, diff.kind, diff.version) == (SNAPSHOT_VERSION, "diff", 1)
    if how == "aggregate":
        repo.aggregate(diff)
    else:
        repo.forget([full.id])
    whole = repo.snapshot(diff.id)
    assert (whole.kind, whole.version) == ("full", SNAPSHOT_VERSION)
    out = tmp_path / "out"
    repo.restore(whole, str(out))
    assert xattrs_of(out) == xattrs_of(source)


def test_a_snapshot_of_a_newer_version_is_refused_by_name():
    sealer = Sealer(bytes(32))
    snap = Snapshot(time="2026-11-30T12:00:00+00:00", kind="full", parent=None, host="h", paths=["/a"],
                    version=SNAPSHOT_VERSION + 1, id="ab" * 32)
    with pytest.raises(CorruptObject, match=f"newer chunkvault \\(snapshot version {SNAPSHOT_VERSION + 1}\\)"):
        Snapshot.decode(sealer, snap.id, snap.encode(sealer))
    snap.version = 1
    assert Snapshot.decode(sealer, snap.id, snap.encode(sealer)).version == 1
    snap.version = True  # FORMAT.md: a reader takes `true` as 1 (another writer's JSON may say so)
    got = Snapshot.decode(sealer, snap.id, snap.encode(sealer))
    assert got.version == 1 and type(got.version) is int
    for bad in (0, False, "1", 1.0):
        snap.version = bad
        with pytest.raises(CorruptObject, match="unsupported snapshot version"):
            Snapshot.decode(sealer, snap.id, snap.encode(sealer))


def test_the_command_line_turns_them_off(cli, source, tmp_path):
    repo = str(tmp_path / "cli-repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, "--no-xattrs", str(source))
    cli("backup", "-r", repo, "--type", "full", str(source))
    cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "a"), "--no-xattrs")
    cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "b"))
    assert all(not attrs for attrs in xattrs_of(tmp_path / "a").values())
    assert xattrs_of(tmp_path / "b") == xattrs_of(source)
    with Repository.open(repo, PASSWORD) as r:
        assert [s.version for s in r.snapshots()] == [1, SNAPSHOT_VERSION]


def test_ls_and_find_list_them_as_diff_compares_them(repo, source, cli, tmp_path):
    """diff called an entry whose attributes alone changed modified, and find gave it two versions, but
    no listing showed attributes: the two versions were listed alike."""
    import base64
    import json

    url = str(tmp_path / "repo0")  # the repo fixture's
    settle()
    repo.backup([str(source)])
    os.setxattr(source / "plain.txt", "user.new", b"\xff\x00")
    repo.backup([str(source)])
    listed = {e["path"]: e for e in json.loads(cli("ls", "-r", url, "latest", "--json").stdout)}
    assert listed["etc/app.conf"]["xattrs"] == {"user.binary": base64.b64encode(bytes(range(256))).decode(),
                                                "user.origin": base64.b64encode(b"config management").decode()}
    assert listed["plain.txt"]["xattrs"] == {"user.new": "/wA="}
    assert listed["etc"]["xattrs"] == {"user.dir": ""}
    (found,) = json.loads(cli("find", "-r", url, "plain.txt", "--json").stdout)
    assert [v["xattrs"] for v in found["versions"]] == [{}, {"user.new": "/wA="}]


def test_a_name_that_is_not_utf8_is_given_exactly_in_json(repo, source, cli, tmp_path):
    """Such a name was only a key with lone surrogates: another language's parser reads them as U+FFFD,
    and two such names as one key, one value lost."""
    import base64
    import json

    url = str(tmp_path / "repo0")  # the repo fixture's
    os.setxattr(source / "plain.txt", b"user.\xff", b"one")
    os.setxattr(source / "plain.txt", b"user.\xfe", b"two")
    repo.backup([str(source)])
    listed = {e["path"]: e for e in json.loads(cli("ls", "-r", url, "latest", "--json").stdout)}
    b64 = {base64.b64decode(k): base64.b64decode(v) for k, v in listed["plain.txt"]["xattrs_b64"].items()}
    assert b64 == {b"user.\xff": b"one", b"user.\xfe": b"two"}
    assert {os.fsencode(k) for k in listed["plain.txt"]["xattrs"]} == set(b64)
    assert "xattrs_b64" not in listed["etc/app.conf"]


def _stored_format(repo_dir) -> int:
    return json.loads((repo_dir / "config").read_bytes())["format"]


def test_the_first_snapshot_with_attributes_raises_the_format_so_a_chunkvault_before_them_refuses(
        new_repo, source, tmp_path, monkeypatch):
    """A chunkvault before extended attributes (format 1) left a version 2 snapshot out as unreadable, and its
    forget of that snapshot's parent rebased nothing onto what remained: the snapshot lost its chain.  Now it
    stops at the config (exit 17) before anything; a repository without such a snapshot stays readable by it."""
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(source)], xattrs=False)
    assert _stored_format(tmp_path / "repo") == 1
    assert repo.backup([str(source)]).snapshot.version == SNAPSHOT_VERSION
    assert _stored_format(tmp_path / "repo") == config_module.FORMAT_XATTRS == 2
    copied = new_repo(str(tmp_path / "copy"))
    repo.copy_to(copied)
    assert _stored_format(tmp_path / "copy") == 2
    monkeypatch.setattr(config_module, "FORMAT_VERSION", 1)  # as the reader before extended attributes
    for where in ("repo", "copy"):
        with pytest.raises(UnsupportedFormat, match="format 2 is newer"):
            config_module.peek_config((tmp_path / where / "config").read_bytes())


def test_a_snapshot_with_attributes_an_append_only_token_stored_has_the_next_prune_raise_the_format(
        tmp_path, http_server, source, cli):
    def env(token):
        return {"CHUNKVAULT_HTTP_TOKEN": token, "CHUNKVAULT_CACHE_DIR": str(tmp_path / f"cache-{token[:6]}")}

    cli("init", "-r", http_server.url, "--kdf-time", "0", env=env(FULL_TOKEN))
    cli("backup", "-r", http_server.url, str(source), env=env(APPEND_TOKEN))
    assert _stored_format(http_server.path) == 1  # the config is not the token's to rewrite
    cli("prune", "-r", http_server.url, env=env(FULL_TOKEN))
    assert _stored_format(http_server.path) == 2


def test_a_config_put_back_from_an_export_made_before_the_first_snapshot_with_attributes_keeps_format_2(
        new_repo, source, tmp_path):
    """The export holds the config at format 1: put back as it was, a chunkvault before extended attributes
    opened the repository again, and its forget could remove the parent of a snapshot it cannot read."""
    path = str(tmp_path / "repo")
    repo = new_repo(path)
    repo.backup([str(source)], xattrs=False)
    kit = repo.export_key()
    repo.backup([str(source)])
    repo.close()
    assert _stored_format(tmp_path / "repo") == 2
    (tmp_path / "repo" / "config").unlink()
    assert Repository.import_key(path, kit, PASSWORD).restored == ["config"]
    assert _stored_format(tmp_path / "repo") == 2
    with Repository.open(path, PASSWORD) as reopened:
        assert reopened.check(read_data=True).ok


def test_key_import_looks_for_a_snapshot_with_attributes_newest_first_and_stops_at_it(new_repo, source, tmp_path):
    """It read every snapshot, oldest or in name order, one at a time: over a remote 50 ms away, minutes for a
    long history of snapshots without attributes, when the one that decides was the newest."""
    from chunkvault.remotes.local import LocalRemote
    from faults import FaultyRemote

    path = str(tmp_path / "repo")
    repo = new_repo(path)
    kit = repo.export_key()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "f").write_text("no attributes\n")
    for i in range(60):
        (plain / "f").write_text(f"version {i}\n")
        repo.backup([str(plain)], xattrs=False)
    repo.backup([str(source)])
    repo.close()
    (tmp_path / "repo" / "config").unlink()
    counted = FaultyRemote(LocalRemote(path), seed=0)
    assert Repository.import_key(counted, kit, PASSWORD).restored == ["config"]
    assert _stored_format(tmp_path / "repo") == 2
    assert counted.calls["get"] < 20, counted.calls


def test_key_import_of_a_history_without_attributes_keeps_format_1(new_repo, tmp_path):
    """Every snapshot is read to be sure, and none raises the format."""
    path = str(tmp_path / "repo")
    repo = new_repo(path)
    kit = repo.export_key()
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(40):
        (plain / "f").write_text(f"version {i}\n")
        repo.backup([str(plain)], xattrs=False)
    repo.close()
    (tmp_path / "repo" / "config").unlink()
    assert Repository.import_key(path, kit, PASSWORD).restored == ["config"]
    assert _stored_format(tmp_path / "repo") == 1
    with Repository.open(path, PASSWORD) as reopened:
        assert len(reopened.snapshots()) == 40


def test_an_append_only_token_is_asked_to_raise_the_format_once_per_object(tmp_path, http_server, source, cli):
    """The config is not the token's to rewrite: each snapshot with extended attributes asked again, one
    config read and one refused write each (a copy of a thousand snapshots, a thousand of each)."""
    cli("init", "-r", http_server.url, "--kdf-time", "0", env={"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN})
    with Repository.open(http_server.url, PASSWORD, token=APPEND_TOKEN, cache=False) as repo:
        remote, asked = repo.store.remote, []
        put = remote.put

        def counted(key, data, **kwargs):
            asked.append(key)
            return put(key, data, **kwargs)

        remote.put = counted
        for i in range(3):
            (source / "plain.txt").write_text(f"run {i}\n")
            assert repo.backup([str(source)], kind="full").snapshot.version == SNAPSHOT_VERSION
        assert asked.count("config") == 1
    assert _stored_format(http_server.path) == 1
