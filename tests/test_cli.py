"""The command line end to end: real processes, exit codes, one-line errors."""
import base64
import dataclasses
import io
import json
import os
from collections import Counter

import blake3
import pytest
from hypothesis import given, strategies as st

from chunkvault.errors import Locked, UsageError, WrongPassword
from conftest import PASSWORD


@pytest.fixture
def setup(tmp_path, cli):
    repo = str(tmp_path / "repo")
    src = tmp_path / "data"
    src.mkdir()
    (src / "a.txt").write_text("alpha\n")
    (src / "sub").mkdir()
    (src / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    cli("init", "-r", repo, "--kdf-time", "0")
    return repo, src


def test_tour(tmp_path, cli, setup):
    repo, src = setup
    out = json.loads(cli("backup", "-r", repo, str(src), "--tag", "nightly", "--json").stdout)
    assert out["type"] == "full" and out["tags"] == ["nightly"] and out["files"] == 2
    (src / "a.txt").write_text("changed\n")
    (src / "c.txt").write_text("new\n")
    os.remove(src / "sub" / "b.bin")
    out2 = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)
    assert out2["type"] == "diff" and out2["parent"] == out["id"]
    snaps = json.loads(cli("snapshots", "-r", repo, "--json").stdout)
    assert [s["id"] for s in snaps] == [out["id"], out2["id"]]
    listing = json.loads(cli("ls", "-r", repo, out["id"][:8], "--json").stdout)
    assert {e["path"] for e in listing} == {"", "a.txt", "sub", "sub/b.bin"}
    changes = json.loads(cli("diff", "-r", repo, out["id"], out2["id"], "--json").stdout)
    assert {(c["change"], c["what"], c["path"]) for c in changes} >= {
        ("modified", "content", "a.txt"), ("added", None, "c.txt"), ("removed", None, "sub/b.bin")}
    os.chmod(src / "c.txt", 0o600)  # metadata alone, and a type: as restic marks them, U and T
    os.remove(src / "a.txt")
    os.symlink("c.txt", src / "a.txt")
    out3 = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)
    lines = cli("diff", "-r", repo, out2["id"], out3["id"]).stdout.decode().splitlines()
    assert "T a.txt  (8 -> 5)" in lines and "U c.txt  (4 -> 4)" in lines
    assert cli("dump", "-r", repo, out["id"], "a.txt").stdout == b"alpha\n"
    target = tmp_path / "restored"
    cli("restore", "-r", repo, out["id"], "--target", str(target))
    assert (target / "a.txt").read_text() == "alpha\n"
    assert (target / "sub" / "b.bin").exists()


def test_diff_compares_the_paths_of_a_multiply_linked_file_by_the_file(tmp_path, cli, setup):
    """Which link holds the data follows the order of the paths: a new link sorting before an unchanged
    file made that file a hard link, and diff called it a type change."""
    repo, src = setup
    first = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]
    os.link(src / "sub" / "b.bin", src / "a-link")  # sorts before sub/b.bin, which becomes the link
    second = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]
    changes = json.loads(cli("diff", "-r", repo, first, second, "--json").stdout)
    assert [c for c in changes if c["path"]] == [  # the root's mtime moved with the new link
        {"change": "added", "what": None, "path": "a-link", "old_size": None, "new_size": 100_000}]
    (src / "sub" / "b.bin").write_bytes(b"rewritten")  # both links change; the file is the first one
    third = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]
    changes = json.loads(cli("diff", "-r", repo, first, third, "--json").stdout)
    assert {(c["change"], c["what"], c["path"]) for c in changes if c["path"]} == {
        ("added", None, "a-link"), ("modified", "content", "sub/b.bin")}
    lines = cli("diff", "-r", repo, second, third).stdout.decode().splitlines()
    assert sorted(line.split("  ")[0] for line in lines[:-1]) == ["M a-link", "M sub/b.bin"]
    assert lines[-1] == "0 added, 0 removed, 2 modified"


def test_diff_sees_no_change_in_a_file_cut_into_chunks_another_way(tmp_path, cli, setup):
    """Backed up again with its data cut at fixed offsets, an unchanged file was "U" (metadata changed)."""
    repo, src = setup
    first = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]
    second = json.loads(cli("backup", "-r", repo, str(src), "--force", "--fixed-chunks", "*", "--fixed-chunk-size",
                            "16K", "--json").stdout)["id"]
    assert json.loads(cli("diff", "-r", repo, first, second, "--json").stdout) == []


def test_json_names_that_are_not_utf8_carry_their_bytes(tmp_path, cli, setup):
    repo, src = setup
    latin1 = b"caf\xe9"
    with open(os.path.join(os.fsencode(src), latin1), "wb") as f:
        f.write(b"x")
    os.symlink(latin1, os.path.join(os.fsencode(src), b"link"))
    (src / "\u00e9t\u00e9").write_text("utf-8 name")
    first = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]
    os.remove(os.path.join(os.fsencode(src), latin1))
    second = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]

    def exact(obj, key):
        raw = base64.b64decode(obj[key + "_b64"]) if key + "_b64" in obj else obj[key].encode()
        assert os.fsencode(obj[key]) == raw  # the text carries the bytes too, for Python's os.fsencode
        return raw

    listing = {exact(e, "path"): e for e in json.loads(cli("ls", "-r", repo, first, "--json").stdout)}
    assert set(listing) == {b"", b"a.txt", b"sub", b"sub/b.bin", latin1, b"link", "\u00e9t\u00e9".encode()}
    assert exact(listing[b"link"], "target") == latin1
    assert "path_b64" not in listing["\u00e9t\u00e9".encode()] and "target_b64" not in listing[latin1]
    found = json.loads(cli("find", "-r", repo, "caf*", "--json").stdout)
    assert [exact(f, "path") for f in found] == [latin1]
    assert all("path" not in v and "path_b64" not in v for v in found[0]["versions"])
    changes = json.loads(cli("diff", "-r", repo, first, second, "--json").stdout)
    assert {(c["change"], exact(c, "path")) for c in changes} >= {("removed", latin1)}


def test_json_names_are_their_utf8_reading_in_any_locale(tmp_path, cli, setup):
    """In the C locale without Python's UTF-8 mode, a UTF-8 name was given as lone surrogates (U+FFFD to
    another language) and without ``path_b64``: its bytes were lost to a program reading the JSON."""
    repo, src = setup
    for name in (b"caf\xc3\xa9", b"caf\xe9"):
        with open(os.path.join(os.fsencode(src), name), "wb") as f:
            f.write(b"x")
    cli("backup", "-r", repo, str(src), "-q")
    ascii_locale = {"LC_ALL": "C", "PYTHONUTF8": "0"}
    listed = {e["path"]: e for e in json.loads(cli("ls", "-r", repo, "latest", "--json", env=ascii_locale).stdout)}
    assert "path_b64" not in listed["caf\u00e9"]
    assert base64.b64decode(listed["caf\udce9"]["path_b64"]) == b"caf\xe9"
    for name in (b"caf\xc3\xa9", b"caf\xe9"):  # restore's own target too
        target = os.path.join(os.fsencode(tmp_path), b"to-" + name)
        done = json.loads(cli("restore", "-r", repo, "latest", "--target", target.decode("utf-8", "surrogateescape"),
                              "--json", env=ascii_locale).stdout)
        assert done["target"] == target.decode("utf-8", "surrogateescape")
        assert base64.b64decode(done.get("target_b64", "")) == (b"" if name == b"caf\xc3\xa9" else target)
    for name in (b"caf\xc3\xa9", b"caf\xe9"):  # the key export's file and a local repository's path too
        where = os.path.join(os.fsencode(tmp_path), b"in-" + name)
        os.mkdir(where)
        export, made = os.path.join(where, b"key.json"), os.path.join(where, b"repo")
        for path, key, argv in ((export, "file", ("key", "export", "-r", repo)),
                                (made, "url", ("init", "--kdf-time", "0", "-r"))):
            text = path.decode("utf-8", "surrogateescape")
            done = json.loads(cli(*argv, text, "--json", env=ascii_locale).stdout)
            assert done[key] == text
            assert base64.b64decode(done.get(f"{key}_b64", "")) == (b"" if name == b"caf\xc3\xa9" else path)


def test_text_output_shows_every_name_on_one_line_escaped(tmp_path, cli, setup):
    """A name with a line break, an escape sequence, a byte that is not UTF-8 or a backslash lists as one
    escaped line, also on a strict UTF-8 stream; an error naming such a path is one line."""
    repo, src = setup
    names = {b"new\nline": "new\\nline", b"esc\x1b[31mred": "esc\\x1b[31mred", b"caf\xe9": "caf\\xe9",
             b"back\\slash": "back\\\\slash"}
    for name in names:
        with open(os.path.join(os.fsencode(src), name), "wb") as f:
            f.write(b"x")
    os.symlink(b"esc\x1b[31mred", os.path.join(os.fsencode(src), b"link"))
    strict = {"PYTHONIOENCODING": "utf-8", "PYTHONUTF8": "0"}
    first = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]
    for name in names:
        os.remove(os.path.join(os.fsencode(src), name))
    second = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]

    listing = cli("ls", "-r", repo, first, env=strict).stdout.decode("utf-8").splitlines()
    assert len(listing) == 1 + 3 + len(names) + 1  # the root, a.txt, sub, sub/b.bin, the names, the link
    assert {line.rsplit("  ", 1)[1] for line in listing} >= set(names.values()) | {"link -> esc\\x1b[31mred"}
    found = cli("find", "-r", repo, "caf*", env=strict).stdout.decode("utf-8").splitlines()
    assert found[0].startswith("caf\\xe9  (")
    diff = cli("diff", "-r", repo, first, second, env=strict).stdout.decode("utf-8").splitlines()
    assert {line.split("  (")[0] for line in diff if line.startswith("- ")} == {f"- {s}" for s in names.values()}
    for out in (listing, found, diff):
        assert not any(c in "".join(out) for c in "\x1b\x7f")
    err = cli("ls", "-r", repo, first, "no\nsuch\x1b[2J", env=strict, check=2).stderr.decode("utf-8")
    assert err.count("\n") == 1 and "\x1b" not in err and "no\\nsuch\\x1b[2J" in err


def test_a_path_given_on_the_command_line_shows_escaped_in_the_summary_line(tmp_path, cli, setup):
    """`init`, `restore`, `key export`, `export`, `import` and `restore --from-file` printed the path they were
    given as it is: an escape sequence in it reached the terminal (errors naming it were escaped)."""
    repo, src = setup
    where = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"x\xff\x1b]0;title\x07\r"))
    os.mkdir(where)
    cli("backup", "-r", repo, str(src), "-q")
    (tmp_path / "pw").write_text("export secret\n")
    export = ["--export-password-file", str(tmp_path / "pw")]
    said = [cli("init", "-r", os.path.join(where, "repo"), "--kdf-time", "0").stdout,
            cli("restore", "-r", repo, "latest", "--target", os.path.join(where, "t1")).stdout,
            cli("key", "export", "-r", repo, os.path.join(where, "key.json")).stdout,
            cli("export", "-r", repo, "latest", "--output", os.path.join(where, "e"), *export).stdout,
            cli("import", "-r", os.path.join(where, "repo"), os.path.join(where, "e"), *export).stdout,
            cli("restore", "--from-file", os.path.join(where, "e"), "--target", os.path.join(where, "t2"),
                *export).stdout]
    for out in said:
        assert out.count(b"\n") == 1 and not any(c in out for c in b"\x1b\x07\r"), out
        assert b"x\\xff\\x1b]0;title\\x07\\r" in out


@pytest.mark.parametrize("tag, shown", [(os.fsdecode(b"\xff"), "'\\xff'"), ("t\x85", "'t\\u0085'"),
                                       ("a\x1b[31m", "'a\\x1b[31m'")])
def test_a_tag_refused_shows_as_a_listing_shows_a_name(tmp_path, cli, setup, tag, shown):
    """The message gave Python's repr: a byte 0xff that is not UTF-8 as '\\udcff', and NEL, which is UTF-8,
    as '\\x85', the form a listing gives a byte that is not."""
    repo, src = setup
    err = cli("backup", "-r", repo, str(src), "--tag", tag, check=2).stderr.decode()
    assert err == f"chunkvault: a tag is one line of text (UTF-8) without control characters, not {shown}\n"


@pytest.mark.parametrize("option, value, said", [
    ("--tag", "nightly, pg", "a tag has no space at either end (a selection by its name would not find it), "
                             "not ' pg': write --tag a,b for two tags"),
    ("--host", "db1 ", "a host has no space at either end (a selection by its name would not find it), not 'db1 '"),
    ("--tag", "\ufeffnightly", "a tag holds no invisible character (a listing would show it without, and a "
                               "selection typed as shown would not find it), not '\\ufeffnightly'"),
    ("--host", "db\u200b1", "a host holds no invisible character (a listing would show it without, and a "
                            "selection typed as shown would not find it), not 'db\\u200b1'"),
])
def test_a_tag_or_host_with_a_space_at_an_end_is_refused(tmp_path, cli, setup, option, value, said):
    """`--tag "nightly, pg"` stored the tag " pg", and `--host "db1 "` (a unit file's stray space) the host
    "db1 ": `snapshots --tag pg` or `--host db1` then found none of them, and the listing showed no difference.
    Likewise a byte order mark or a zero-width space pasted in with a name."""
    repo, src = setup
    assert cli("backup", "-r", repo, str(src), option, value, check=2).stderr.decode() == f"chunkvault: {said}\n"
    assert cli("snapshots", "-r", repo, "--json").stdout.strip() == b"[]"


def test_key_list_shows_a_key_file_s_fields_on_one_line(tmp_path, cli, setup):
    """A key file's host and user are not sealed: whoever can write the storage can plant a key file naming
    any, which the listing shows escaped, never as terminal control sequences."""
    repo, _ = setup
    (key,) = os.listdir(os.path.join(repo, "keys"))
    path = os.path.join(repo, "keys", key)
    with open(path) as f:
        doc = json.load(f)
    doc["host"] = "evil\x1b]0;owned\x07\nhost"
    planted = json.dumps(doc).encode()
    with open(os.path.join(repo, "keys", blake3.blake3(planted).hexdigest()), "wb") as f:
        f.write(planted)  # named by its content, as a key file is
    out = cli("key", "list", "-r", repo).stdout.decode("utf-8")
    assert out.count("\n") == 2 and "\x1b" not in out and "@evil\\x1b]0;owned\\x07\\nhost" in out


def test_repository_from_environment_and_password_file(tmp_path, cli, setup):
    repo, src = setup
    pwfile = tmp_path / "pw"
    pwfile.write_text("correct horse battery staple\n")
    cli("backup", str(src), env={"CHUNKVAULT_REPOSITORY": repo, "CHUNKVAULT_PASSWORD_FILE": str(pwfile)},
        password=None)
    cli("snapshots", "-r", repo, "--password-file", str(pwfile), password=None)


def test_stdin_backup(tmp_path, cli, setup):
    repo, _ = setup
    data = os.urandom(500_000)
    cli("backup", "-r", repo, "--stdin", "--stdin-name", "db.sql", input=data)
    snaps = json.loads(cli("snapshots", "-r", repo, "--json").stdout)
    assert snaps[0]["stdin_name"] == "db.sql"
    assert cli("dump", "-r", repo, "latest", "db.sql").stdout == data


def test_fixed_chunks_from_the_command_line(tmp_path, cli, setup):
    repo, src = setup
    (src / "table.db").write_bytes(os.urandom(300_000))
    cli("backup", "-r", repo, str(src), "--fixed-chunks", "*.db", "--fixed-chunk-size", "64K")
    listing = json.loads(cli("ls", "-r", repo, "latest", "--json").stdout)
    table = next(e for e in listing if e["path"] == "table.db")
    assert table["chunks"] == 5  # 4 x 64 KiB + the rest
    data = os.urandom(200_000)
    cli("backup", "-r", repo, "--stdin", "--stdin-name", "x.db", "--fixed-chunks", "*.db", "--fixed-chunk-size", "64K",
        input=data)
    assert cli("dump", "-r", repo, "latest", "x.db").stdout == data
    err = cli("backup", "-r", repo, str(src), "--fixed-chunks", "*", "--fixed-chunk-size", "1K", check=2).stderr
    assert b"fixed chunk size" in err and err.count(b"\n") == 1


@pytest.mark.parametrize("args,code,message", [
    (["snapshots"], 11, "wrong password"),
])
def test_wrong_password(cli, setup, args, code, message):
    repo, _ = setup
    proc = cli(*args, "-r", repo, password="not the password", check=code)
    err = proc.stderr.decode()
    assert message in err and len(err.strip().splitlines()) == 1


def test_error_exit_codes(tmp_path, cli, setup):
    repo, src = setup
    assert cli("snapshots", "-r", str(tmp_path / "nope"), check=10).stderr.decode().count("\n") == 1
    assert b"no snapshot" in cli("restore", "-r", repo, "abcdef", "--target", str(tmp_path / "t"), check=12).stderr
    cli("backup", "-r", repo, str(src))
    target = tmp_path / "busy"
    target.mkdir()
    (target / "x").write_text("x")
    assert cli("restore", "-r", repo, "latest", "--target", str(target), check=16).stderr.count(b"\n") == 1
    assert cli("init", "-r", repo, "--kdf-time", "0", check=10).returncode == 10
    assert cli("backup", "-r", repo, str(tmp_path / "missing"), check=2).returncode == 2
    assert cli("frobnicate", check=2).returncode == 2
    assert cli("snapshots", "-r", repo, password=None, check=2).returncode == 2


def test_newer_format_refused_before_password(tmp_path, cli, setup):
    repo, _ = setup
    cfg_path = os.path.join(repo, "config")
    cfg = json.load(open(cfg_path))
    cfg["format"] = 99
    json.dump(cfg, open(cfg_path, "w"))
    err = cli("snapshots", "-r", repo, password="wrong anyway", check=17).stderr.decode()
    assert "newer" in err


def test_a_snapshot_a_newer_chunkvault_wrote_is_never_called_damage_to_forget(tmp_path, cli, setup):
    """Hosts sharing a repository upgrade one at a time: an older one leaves the newer one's snapshot out
    and says to upgrade (exit 17), never that it is corrupt and should be forgotten."""
    from chunkvault import Repository
    from chunkvault.store.snapshot import SNAPSHOT_VERSION

    repo, src = setup
    cli("backup", "-r", repo, str(src))
    newer = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]  # a differential on the first
    store = Repository.open(repo, PASSWORD, ledger=False).store
    snap = store.load_snapshot(newer)
    snap.version = SNAPSHOT_VERSION + 1
    store.save_snapshot(snap, replace=True)
    snaps = [s for s in store.snapshot_names() if s != newer]

    err = cli("restore", "-r", repo, newer[:8], "--target", str(tmp_path / "out"), check=17).stderr.decode()
    assert "newer chunkvault" in err and "upgrade" in err and "forget" not in err
    listing = cli("snapshots", "-r", repo)
    assert "left out: written by a newer chunkvault" in listing.stderr.decode()
    assert newer[:8] not in listing.stdout.decode()
    check = cli("check", "-r", repo)  # nothing damaged: the newer snapshot is not checked
    for spec in ("latest", newer[:8]):  # this version cannot verify it: neither passed nor failed
        err = cli("verify-restore", "-r", repo, spec, check=17).stderr.decode()
        assert "newer chunkvault" in err and "cannot verify it" in err, spec
    assert "not checked" in check.stdout.decode() + check.stderr.decode()
    for command in (["forget", "--keep-last", "1"], ["forget", snaps[0]], ["prune"]):
        err = cli(*command, "-r", repo, check=17).stderr.decode()
        assert "newer chunkvault" in err and "forget it" not in err, command
    out = cli("repair", "snapshots", "-r", repo).stdout.decode()
    assert f"not looked at {newer[:8]}" in out and "forget" not in out
    assert len(Repository.open(repo, PASSWORD, ledger=False).store.snapshot_names()) == 2
    child = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]  # on the older one, as latest
    store.save_snapshot(dataclasses.replace(store.load_snapshot(child), parent=newer), replace=True)
    check = cli("check", "-r", repo)  # a differential on the newer snapshot: not damage either
    assert f"built on snapshot {newer[:8]}, which a newer chunkvault wrote" in check.stdout.decode() + check.stderr.decode()


def test_unreadable_directory_gives_partial_exit_code(tmp_path, cli, setup):
    repo, src = setup
    if os.geteuid() == 0:
        # root reads everything; a directory that vanishes mid-walk is not reproducible here,
        # so use a file that is not a regular readable one: a FIFO is stored as a FIFO, not read.
        pytest.skip("running as root: permission errors cannot be produced")
    locked = src / "locked"
    locked.mkdir()
    (locked / "x").write_text("x")
    os.chmod(locked, 0)
    try:
        proc = cli("backup", "-r", repo, str(src), check=3)
        assert b"locked" in proc.stderr
    finally:
        os.chmod(locked, 0o700)


def test_a_missing_source_path_gives_the_partial_exit_code(tmp_path, cli, setup):
    repo, src = setup
    proc = cli("backup", "-r", repo, str(src), str(tmp_path / "gone"), check=3)
    lines = proc.stderr.decode().splitlines()
    assert f"warning: source path does not exist, skipped: {tmp_path / 'gone'}" in lines
    assert lines[-1].endswith("but 1 path(s) could not be read")
    cli("backup", "-r", repo, str(tmp_path / "gone"), check=2)


def test_relative_paths_from_a_removed_working_directory_are_a_usage_error(tmp_path, cli, setup):
    """`backup .` (or a relative repository) run from a directory removed since: getcwd fails, which was an
    internal error's traceback (exit 1); one line and exit 2 now.  Absolute paths need no working directory."""
    repo, src = setup
    gone = tmp_path / "gone"
    gone.mkdir()
    from_gone = ("sh", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "$@"', "sh")
    proc = cli("backup", "-r", repo, ".", check=2, wrap=from_gone)
    assert proc.stderr.decode().splitlines() == [
        "chunkvault: source path . is relative, and the working directory no longer exists: give it as an "
        "absolute path, or change to a directory that exists"]
    gone.mkdir()
    proc = cli("snapshots", "-r", "relrepo", check=2, wrap=from_gone)
    assert b"local repository path relrepo is relative, and the working directory no longer exists" in proc.stderr
    gone.mkdir()
    cli("backup", "-r", repo, str(src), wrap=from_gone)
    gone.mkdir()  # a relative restore target likewise (it was FileNotFoundError, an internal error)
    proc = cli("restore", "-r", repo, "latest", "--target", "out", check=2, wrap=from_gone)
    assert b"restore target out is relative, and the working directory no longer exists" in proc.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_an_unwritable_stderr_leaves_the_exit_codes_as_they_are(tmp_path, setup):
    """cron's log on a full disk: what could not be said is lost, the exit code still tells (it was 1)."""
    import subprocess
    import sys

    repo, src = setup
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}, "CHUNKVAULT_PASSWORD": PASSWORD}
    with open("/dev/full", "w") as full:
        for args, code in ((["backup", "-r", repo, str(src), str(tmp_path / "gone")], 3),
                           (["snapshots", "-r", str(tmp_path / "none")], 10)):
            proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", *args], env=env, stdout=subprocess.PIPE,
                                  stderr=full, timeout=120)
            assert proc.returncode == code, args


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_key_export_to_a_full_stdout_says_the_export_is_incomplete(tmp_path, setup):
    """It said "only its report is lost": the export is the product, and a script must not keep it."""
    import subprocess
    import sys

    repo, _ = setup
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}, "CHUNKVAULT_PASSWORD": PASSWORD}
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", "key", "export", "-r", repo], env=env,
                              stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 14
    assert proc.stderr.decode().strip() == ("chunkvault: no space left on device while writing to standard output "
                                            "(the key export written there is incomplete)")


def test_keys(tmp_path, cli, setup):
    repo, src = setup
    cli("key", "add", "-r", repo, "--kdf-time", "0", env={"CHUNKVAULT_NEW_PASSWORD": "second"})
    keys = json.loads(cli("key", "list", "-r", repo, "--json").stdout)
    assert len(keys) == 2
    cli("snapshots", "-r", repo, password="second")
    other = next(k["id"] for k in keys if not k["current"])
    # cannot remove the key we are using; can remove the other
    cli("key", "remove", "-r", repo, keys[[k["current"] for k in keys].index(True)]["id"], check=2)
    cli("key", "remove", "-r", repo, other)
    cli("snapshots", "-r", repo, password="second", check=11)
    cli("key", "passwd", "-r", repo, "--kdf-time", "0", env={"CHUNKVAULT_NEW_PASSWORD": "third"})
    cli("snapshots", "-r", repo, password="third")
    cli("snapshots", "-r", repo, check=11)


def test_forget_dry_run_and_policy(tmp_path, cli, setup):
    repo, src = setup
    for i in range(4):
        (src / f"n{i}").write_text(str(i))
        cli("backup", "-r", repo, str(src))
    dry = json.loads(cli("forget", "-r", repo, "--keep-last", "2", "--dry-run", "--json").stdout)
    assert [d["keep"] for d in dry["decisions"]].count(False) == 2
    assert all(d["reasons"] for d in dry["decisions"])
    assert len(json.loads(cli("snapshots", "-r", repo, "--json").stdout)) == 4
    text = cli("forget", "-r", repo, "--keep-last", "2").stdout.decode()
    assert "removed 2" in text
    left = json.loads(cli("snapshots", "-r", repo, "--json").stdout)
    assert len(left) == 2
    cli("check", "-r", repo, "--read-data")
    out = tmp_path / "after-forget"
    cli("restore", "-r", repo, "latest", "--target", str(out))
    assert sorted(os.listdir(out)) == ["a.txt", "n0", "n1", "n2", "n3", "sub"]
    assert cli("forget", "-r", repo, check=2).returncode == 2


def test_a_backup_behind_a_prune_waits_only_as_long_as_wait_says(tmp_path, cli, setup):
    """It waited up to an hour, with no option to fail fast (every other locking command has --wait)."""
    from chunkvault import Repository
    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    repo, src = setup
    with Repository.open(repo, PASSWORD) as r, RepoLock(r.store.remote, EXCLUSIVE, "prune"):
        err = cli("backup", "-r", repo, str(src), "--wait", "0", check=15).stderr
        assert b"locked by prune" in err
        err = cli("backup", "-r", repo, "--stdin", "--stdin-name", "x", "--wait", "0", input=b"x", check=15).stderr
        assert b"locked by prune" in err
        with pytest.raises(UsageError, match="wait takes seconds"):
            r.backup([str(src)], wait=-1)
    assert json.loads(cli("snapshots", "-r", repo, "--json").stdout) == []


def test_forget_dry_run_behind_a_prune_waits_only_as_long_as_wait_says(tmp_path, cli, setup):
    """Its estimate of what a prune frees read the snapshots under a shared lock that waited an hour; now
    the estimate alone is left out when the lock is not had within --wait."""
    from chunkvault import Repository
    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    repo, src = setup
    for i in range(3):
        (src / f"n{i}").write_text(str(i))
        cli("backup", "-r", repo, str(src), "-q")
    with Repository.open(repo, PASSWORD) as r, RepoLock(r.store.remote, EXCLUSIVE, "prune"):
        done = cli("forget", "-r", repo, "--keep-last", "1", "--dry-run", "--wait", "0")
    assert b"what a prune then frees is left out: " in done.stderr and b"locked by prune" in done.stderr
    assert b"would remove 2 snapshot(s)" in done.stdout  # the plan is shown all the same


def test_aggregate_retire_names_what_it_forgot_and_rebased(tmp_path, cli, setup):
    repo, src = setup
    ids = []
    for i in range(3):
        (src / f"n{i}").write_text(str(i))
        ids.append(json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"])
    (src / "branch").write_text("b")
    branch = json.loads(cli("backup", "-r", repo, str(src), "--parent", ids[1], "--json").stdout)
    assert branch["parent"] == ids[1]
    cli("tag", "-r", repo, ids[1], "--add", "pinned,audit")
    done = cli("aggregate", "-r", repo, ids[2][:8], "--retire")
    assert done.stderr.decode().splitlines() == [
        f"warning: snapshot {ids[1][:8]} of the former chain, tagged pinned, audit, was forgotten with it"]
    text = done.stdout.decode().splitlines()
    assert text == [f"remove  {ids[0][:8]}  its former chain", f"remove  {ids[1][:8]}  its former chain",
                    f"rebase  {branch['id'][:8]}  as a full snapshot, merging {ids[0][:8]} {ids[1][:8]}",
                    f"snapshot {ids[2][:8]} is now a full snapshot; retired its former chain: "
                    "2 snapshot(s) removed, 1 rebased"]
    left = {s["id"]: s for s in json.loads(cli("snapshots", "-r", repo, "--json").stdout)}
    assert set(left) == {ids[2], branch["id"]} and {s["type"] for s in left.values()} == {"full"}
    (src / "n3").write_text("3")
    newer = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]
    out = json.loads(cli("aggregate", "-r", repo, newer, "--retire", "--json").stdout)
    assert out["id"] == newer and out["type"] == "full"
    assert out["retired"] == [branch["id"]] and out["rebased"] == [] and out["warnings"] == []
    assert json.loads(cli("aggregate", "-r", repo, newer, "--json").stdout)["retired"] == []
    assert cli("aggregate", "-r", repo, newer).stdout.decode() == f"snapshot {newer[:8]} was already a full snapshot\n"


def test_aggregate_dry_run_plans_what_the_run_then_does_and_filters_pick_the_source(tmp_path, cli, setup):
    """`aggregate latest --path P` is that source's newest, not the repository's; `--dry-run` shows the plan
    (the snapshot as it would be, what --retire would forget and rebase) and writes nothing."""
    repo, src = setup
    other = tmp_path / "other"
    other.mkdir()
    ids = []
    for i in range(3):
        (src / f"n{i}").write_text(str(i))
        ids.append(json.loads(cli("backup", "-r", repo, str(src), "--host", "here", "--json").stdout)["id"])
        (other / f"o{i}").write_text(str(i))
        cli("backup", "-r", repo, str(other), "--host", "elsewhere")
    (src / "branch").write_text("b")
    branch = json.loads(cli("backup", "-r", repo, str(src), "--host", "here", "--parent", ids[1],
                            "--json").stdout)["id"]
    cli("tag", "-r", repo, ids[1], "--add", "pinned")
    cli("backup", "-r", repo, str(other), "--host", "elsewhere")  # the repository's newest is another source's
    objects = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "repo").rglob("*") if p.is_file())
    listing = cli("snapshots", "-r", repo, "--json").stdout
    select = ["latest", "--path", str(src), "--host", "here"]
    plan = json.loads(cli("aggregate", "-r", repo, *select, "--retire", "--dry-run", "--json").stdout)
    assert plan["id"] == branch and plan["type"] == "full" and plan["parent"] is None and plan["dry_run"]
    assert plan["retired"] == [ids[0], ids[1]] and plan["warnings"] == [
        f"snapshot {ids[1][:8]} of the former chain, tagged pinned, would be forgotten with it"]
    assert [r["id"] for r in plan["rebased"]] == [ids[2]]
    text = cli("aggregate", "-r", repo, *select, "--retire", "-n").stdout.decode().splitlines()
    assert text[-1] == (f"snapshot {branch[:8]} would become a full snapshot; retiring its former chain would "
                        "remove 2 snapshot(s) and rebase 1")
    assert cli("snapshots", "-r", repo, "--json").stdout == listing
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "repo").rglob("*") if p.is_file()) == objects
    done = json.loads(cli("aggregate", "-r", repo, *select, "--retire", "--json").stdout)
    assert not done["dry_run"] and {k: done[k] for k in ("id", "type", "retired", "rebased")} == \
        {k: plan[k] for k in ("id", "type", "retired", "rebased")}
    assert json.loads(cli("aggregate", "-r", repo, "latest", "--host", "elsewhere", "-n", "--json").stdout)[
        "parent"] is None  # that host's newest, a differential, would become a full
    missing = cli("aggregate", "-r", repo, ids[2][:8], "--host", "elsewhere", "-n", check=12)
    assert b"not among those the host, tag and path" in missing.stderr


def test_forget_preset_from_config(tmp_path, cli, setup):
    repo, src = setup
    cli("backup", "-r", repo, str(src))
    cfg = tmp_path / "retention.toml"
    cfg.write_text('[presets.business]\nkeep-full-within = "30d"\nkeep-diff-within = "7d"\n')
    out = json.loads(cli("forget", "-r", repo, "--preset", "business", "--config", str(cfg), "--dry-run",
                         "--json").stdout)
    assert all(d["keep"] for d in out["decisions"])
    assert cli("forget", "-r", repo, "--preset", "nope", "--config", str(cfg), check=2).returncode == 2


def test_a_preset_counts_days_in_its_file_s_timezone(tmp_path, cli, setup):
    """The file's timezone was ignored: `forget --preset` counted days in local time (UTC here), where `run`
    counts them in the file's zone, so a dry run could not preview what the daemon would remove."""
    repo, src = setup
    for at in ("2026-01-10T21:00:00Z", "2026-01-10T22:30:00Z", "2026-01-10T23:30:00Z"):  # 23:30Z is the 11th in Berlin
        (src / "n").write_text(at)
        cli("backup", "-r", repo, str(src), "--time", at)
    cfg = tmp_path / "retention.toml"
    cfg.write_text('timezone = "Europe/Berlin"\n[presets.d]\nkeep-daily = 5\n')
    out = json.loads(cli("forget", "-r", repo, "--preset", "d", "--config", str(cfg), "--dry-run", "--json",
                         env={"TZ": "UTC"}).stdout)
    assert [d["keep"] for d in out["decisions"]] == [True, True, True]
    out = json.loads(cli("forget", "-r", repo, "--keep-daily", "5", "--dry-run", "--json", env={"TZ": "UTC"}).stdout)
    assert sorted(d["keep"] for d in out["decisions"]) == [False, True, True]


def test_a_preset_keeps_its_tag_sets_and_its_grouping_by_nothing(tmp_path, cli, setup):
    """keep-tags in a preset failed every forget (its sets came back as frozensets); an empty group-by fell back
    to the default grouping by host and paths."""
    repo, src = setup
    other = tmp_path / "other"
    other.mkdir()
    ids = [json.loads(cli("backup", "-r", repo, str(path), *tags, "--json").stdout)["id"]
           for path, tags in ((src, ("--tag", "pinned")), (src, ()), (other, ()))]
    cfg = tmp_path / "retention.toml"
    cfg.write_text('[presets.p]\nkeep-last = 1\nkeep-tags = ["pinned"]\ngroup-by = ""\n')
    out = json.loads(cli("forget", "-r", repo, "--preset", "p", "--config", str(cfg), "--dry-run", "--json").stdout)
    assert sorted(d["id"] for d in out["decisions"] if d["keep"]) == sorted([ids[0], ids[2]])


def test_each_command_parses_with_its_own_parser_alone():
    """A command line is parsed by a parser holding only its command (the rest are not built): that
    parser must know every option and default the whole parser's does."""
    from chunkvault.cli import _parse, _subcommands, build_parser

    whole = _subcommands(build_parser())
    for name, full in whole.items():
        alone = _subcommands(build_parser(name))
        assert list(alone) == [name]
        assert sorted(a.option_strings for a in alone[name]._actions) == \
            sorted(a.option_strings for a in full._actions), name
        assert alone[name]._defaults == full._defaults, name
    assert _parse(["verify-restore", "-r", "x"]).func.__name__ == "cmd_verify_restore"
    assert _parse(["restore", "-r", "x", "-t", "out", "--from-file", "f.backup"]).from_file == "f.backup"
    with pytest.raises(UsageError, match="invalid choice: 'no-such-command' \\(choose from 'init', 'backup'"):
        _parse(["no-such-command"])  # the whole parser names every command


def test_options_may_come_between_a_command_s_arguments():
    """As restic's and borg's: ``ls SNAP --json PATH`` and ``forget A --prune B`` mean what they would with
    the options last; a missing or surplus argument is still one usage error."""
    from chunkvault.cli import _parse

    args = _parse(["ls", "latest", "--json", "sub/b.bin", "-r", "x"])
    assert (args.snapshot, args.path, args.json, args.repo) == ("latest", "sub/b.bin", True, "x")
    args = _parse(["forget", "aa", "--prune", "bb", "--keep-last", "2", "cc"])
    assert (args.snapshots, args.prune, args.keep_last) == (["aa", "bb", "cc"], True, 2)
    args = _parse(["backup", "d1", "--tag", "t", "d2", "-r", "x"])
    assert (args.paths, args.tag) == (["d1", "d2"], ["t"])
    assert _parse(["restore", "--target", "out"]).snapshot == "latest"
    assert _parse(["dump", "-r", "x", "s", "--archive", "zip", "/"]).path == "/"
    assert _parse(["key", "add", "-r", "x"]).command == "key"
    assert _parse(["backup", "--stdin-from-command", "--stdin-name", "a", "--", "pg_dump", "-Fc", "app"]
                  ).paths == ["pg_dump", "-Fc", "app"]
    assert _parse(["backup", "-r", "x", "--", "-data", "--tag"]).paths == ["-data", "--tag"]
    with pytest.raises(UsageError, match="unrecognized arguments: c"):
        _parse(["ls", "a", "--json", "b", "c"])
    assert _parse(["ls", "--json"]).snapshot == "latest"
    with pytest.raises(UsageError, match="required: path"):
        _parse(["dump", "--json"])


def test_no_option_is_taken_from_a_prefix_of_its_name():
    """``restore --del`` is not ``--delete``, nor ``--keep-da`` ``--keep-daily``: a typo or a
    half-remembered option is refused by name, never widened into another (a destructive one)."""
    from chunkvault.cli import _parse

    for argv, prefix in ((["restore", "latest", "--target", "t", "--del"], "--del"),
                         (["forget", "--keep-da", "2"], "--keep-da"),
                         (["backup", "d", "--dry"], "--dry"),
                         (["check", "--read-data-sub", "1/2"], "--read-data-sub"),
                         (["verify-restore", "--all-s", "7d"], "--all-s")):
        with pytest.raises(UsageError, match=f"unrecognized arguments: {prefix}"):
            _parse(argv)
    assert _parse(["backup", "d", "-qn"]).dry_run  # short options still group


@given(st.binary(max_size=40))
def test_a_json_name_gives_back_its_exact_bytes(raw):
    from chunkvault.cli import _name_json

    out = _name_json("path", raw)
    assert os.fsencode(out["path"]) == raw
    try:
        raw.decode("utf-8")
        assert "path_b64" not in out and out["path"] == raw.decode("utf-8")
    except UnicodeDecodeError:
        assert base64.b64decode(out["path_b64"]) == raw


@pytest.mark.parametrize("command", [["rewrite", "--exclude", "a.txt"], ["repair", "snapshots"],
                                     ["restore", "latest", "--target", "{target}"]])
def test_a_wrong_confirmation_word_is_a_usage_error_and_changes_nothing(tmp_path, cli, setup, command):
    """Not a dry run that exits 0: a script that typed the word wrong must hear of it."""
    repo, src = setup
    cli("backup", "-r", repo, str(src))
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("mine")
    before = cli("snapshots", "-r", repo, "--json").stdout
    args = [a.format(target=target) for a in command]
    proc = cli(*args, "-r", repo, "--confirm", "yes", check=2)
    assert b"--confirm takes the word " in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert cli("snapshots", "-r", repo, "--json").stdout == before
    assert [p.name for p in target.iterdir()] == ["keep"]


def _stopped_while_loading(signame: str, *argv: str):
    """The command of ``argv`` run through the entry point, ``signame`` landing while the command's modules are
    imported (here: when the entry point asks for them)."""
    import subprocess
    import sys

    program = f"""
import os, signal, sys, time, types
import chunkvault.console as console
sys.argv[1:] = {list(argv)!r}
loading = types.ModuleType("chunkvault.cli")
def __getattr__(name):
    os.kill(os.getpid(), signal.{signame})
    time.sleep(30)
loading.__getattr__ = __getattr__
sys.modules["chunkvault.cli"] = loading
sys.exit(console.main())
"""
    return subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60)


@pytest.mark.parametrize("signame, code, said", [("SIGINT", 130, b"chunkvault: interrupted"),
                                                 ("SIGTERM", 143, b"chunkvault: terminated"),
                                                 ("SIGQUIT", 131, b"chunkvault: quit")])
def test_a_stop_signal_while_the_command_is_still_loading_ends_it_as_later(signame, code, said):
    proc = _stopped_while_loading(signame, "snapshots")
    assert proc.returncode == code and proc.stderr.strip() == said and proc.stdout == b"", proc.stderr


@pytest.mark.parametrize("signame, code, kind", [("SIGINT", 130, "Interrupted"), ("SIGTERM", 143, "Terminated"),
                                                 ("SIGHUP", 129, "HungUp")])
def test_with_json_a_stop_while_the_command_is_still_loading_prints_the_error_document(signame, code, kind):
    """A program reading ``--json`` output gets the document a stop later gives, not an empty stdout."""
    proc = _stopped_while_loading(signame, "snapshots", "--json")
    assert proc.returncode == code, proc.stderr
    word = {"Interrupted": "interrupted", "Terminated": "terminated", "HungUp": "hung up"}[kind]
    assert json.loads(proc.stdout) == {"error": {"type": kind, "exit_code": code, "message": word}}
    assert proc.stderr.strip() == f"chunkvault: {word}".encode()


def test_with_json_a_stop_before_the_command_has_its_own_handlers_prints_the_error_document():
    """Loaded, the command tunes the allocator and wraps its output before its handlers are in: a stop there
    found the entry point's handler told the command had begun, and printed no document."""
    import subprocess
    import sys

    program = """
import os, signal, sys, time
import chunkvault.console as console, chunkvault.memory as memory
sys.argv[1:] = ["snapshots", "--json"]
def tune_allocator():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
memory.tune_allocator = tune_allocator
sys.exit(console.main())
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60)
    assert proc.returncode == 143 and proc.stderr.strip() == b"chunkvault: terminated", proc.stderr
    assert json.loads(proc.stdout) == {"error": {"type": "Terminated", "exit_code": 143, "message": "terminated"}}


def test_with_json_a_stop_after_the_command_printed_its_document_adds_no_second_one():
    """A stop landing once the command is done (its handlers gone, the interpreter ending) prints the line
    and exits 130, but the document on stdout stays the one the command printed."""
    import subprocess
    import sys

    program = """
import os, signal, sys, types
import chunkvault.console as console
sys.argv[1:] = ["snapshots", "--json"]
done = types.ModuleType("chunkvault.cli")
def main():
    console.begun()  # as the command does once its handlers are in
    os.write(1, b"[]\\n")
    os.kill(os.getpid(), signal.SIGINT)
    return 0
done.main = main
sys.modules["chunkvault.cli"] = done
sys.exit(console.main())
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip() == b"chunkvault: interrupted", proc.stderr
    assert json.loads(proc.stdout) == []


def test_the_snapshots_table_shows_whole_host_names(tmp_path, cli, setup):
    """Cut at 12 characters, db-production-server-01 and -02 both read db-productio."""
    repo, src = setup
    for host in ("db-production-server-01", "db-production-server-02"):
        cli("backup", "-r", repo, str(src), "--host", host, "-q")
    lines = cli("snapshots", "-r", repo).stdout.decode().splitlines()
    assert [h for line in lines[1:3] for h in line.split() if h.startswith("db-")] == [
        "db-production-server-01", "db-production-server-02"]


def test_snapshots_json_gives_each_chain_as_it_is_now(tmp_path, cli, setup):
    """After a forget rebases the differentials (or an aggregate), their recorded chain lengths are stale."""
    repo, src = setup
    ids = []
    for i in range(4):
        (src / "a.txt").write_text(f"version {i}\n")
        ids.append(json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"])
    before = {s["id"]: s["stats"]["chain_length"] for s in json.loads(cli("snapshots", "-r", repo, "--json").stdout)}
    assert [before[i] for i in ids] == [1, 2, 3, 4]
    cli("forget", "-r", repo, ids[0])
    snaps = json.loads(cli("snapshots", "-r", repo, "--json").stdout)
    parents = {s["id"]: s["parent"] for s in snaps}
    for s in snaps:
        length, at = 1, s["id"]
        while parents[at] is not None:
            length, at = length + 1, parents[at]
        assert s["stats"]["chain_length"] == length
    assert [s["stats"]["chain_length"] for s in snaps] == [1, 2, 3]


def test_with_json_a_command_that_fails_before_its_document_prints_an_error_document(tmp_path, cli, setup):
    repo, src = setup
    wrong = cli("snapshots", "-r", repo, "--json", password="wrong", check=11)
    assert json.loads(wrong.stdout) == {"error": {"type": "WrongPassword", "exit_code": 11,
                                                  "message": json.loads(wrong.stdout)["error"]["message"]}}
    assert wrong.stderr.decode().startswith("chunkvault: ") and len(wrong.stderr.splitlines()) == 1
    missing = json.loads(cli("ls", "-r", repo, "deadbeef", "--json", check=12).stdout)["error"]
    assert missing["exit_code"] == 12 and "deadbeef" in missing["message"]
    # one document: a command that printed its own before failing prints no second one
    huge = cli("init", "-r", str(tmp_path / "huge"), "--kdf-time", "0", "--pack-size", "64G", check=2)
    assert b"pack size must be 1 byte to 256 MiB" in huge.stderr  # every backup had failed for memory
    small = str(tmp_path / "small-packs")
    cli("init", "-r", small, "--kdf-time", "0", "--pack-size", "1")  # a pack per blob: the largest is b.bin's
    cli("backup", "-r", small, str(src))
    max((p for p in (tmp_path / "small-packs" / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
        ).unlink()
    out = cli("restore", "-r", small, "latest", "--target", str(tmp_path / "out"), "--json", check=13).stdout
    assert "error" not in json.loads(out) and json.loads(out)["not_restored"]


def test_with_standard_output_closed_json_is_dropped_as_text_is(tmp_path, cli, setup):
    """Started with stdout closed (``>&-``), a command's document reaches no one, as its text does: the
    command still does its work and ends with its own code.  ``--json`` ended in an internal error."""
    repo, src = setup
    closed = ("sh", "-c", '"$@" >&-', "sh")
    backup = cli("backup", "-r", repo, str(src), "--json", wrap=closed)
    assert backup.stderr == b""
    assert len(json.loads(cli("snapshots", "-r", repo, "--json").stdout)) == 1
    for argv in (("snapshots", "--json"), ("ls", "latest", "--json"), ("check", "--json")):
        assert cli(argv[0], "-r", repo, *argv[1:], wrap=closed).stderr == b""
    wrong = cli("snapshots", "-r", repo, "--json", password="wrong", check=11, wrap=closed)
    assert wrong.stderr.decode().startswith("chunkvault: wrong password")


def test_a_key_export_to_standard_output_closed_is_refused_as_a_dump_is(tmp_path, cli, setup):
    """``key export`` with stdout closed (``>&-``) had nowhere to write the export: an internal error
    (AttributeError: no ``buffer``).  It is refused, as ``dump`` and ``cat blob`` are, before the repository
    is opened."""
    repo, _ = setup
    closed = ("sh", "-c", '"$@" >&-', "sh")
    for argv in (("key", "export"), ("key", "export", "-")):
        refused = cli(*argv[:2], "-r", repo, *argv[2:], check=14, wrap=closed)
        assert refused.stderr.decode().strip() == (
            "chunkvault: key export: standard output is closed: redirect it to a file or a pipe")
    assert json.loads(cli("key", "export", "-r", repo).stdout)  # and with it open, the export


@pytest.mark.parametrize("signame, code, kind", [("SIGINT", 130, "Interrupted"), ("SIGTERM", 143, "Terminated")])
def test_with_json_a_command_stopped_by_a_signal_prints_an_error_document(tmp_path, setup, password, signame, code,
                                                                         kind):
    """Stopped while it waits for a prune's lock, the command still gives a program its one document."""
    import signal
    import subprocess
    import sys

    from chunkvault import Repository
    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    repo, src = setup
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")} | {"CHUNKVAULT_PASSWORD": password}
    with Repository.open(repo, password, ledger=False) as held, RepoLock(held.store.remote, EXCLUSIVE, "prune"):
        proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "restore", "-r", repo, "latest", "--target",
                                 str(tmp_path / "out"), "--json", "--wait", "60"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stderr.readline().startswith(b"warning: waiting up to 60 s")
        proc.send_signal(getattr(signal, signame))
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert json.loads(out) == {"error": {"type": kind, "exit_code": code, "message": kind.lower()}}


@pytest.mark.parametrize("given_as", ["sub/b.bin", "/sub/b.bin", "./sub/b.bin", "sub//b.bin", "/sub/./b.bin/"])
def test_a_path_in_a_snapshot_may_be_given_as_a_shell_writes_it(tmp_path, cli, setup, given_as):
    repo, src = setup
    cli("backup", "-r", repo, str(src))
    assert cli("dump", "-r", repo, "latest", given_as).stdout == (src / "sub" / "b.bin").read_bytes()
    listed = json.loads(cli("ls", "-r", repo, "latest", given_as, "--json").stdout)
    assert [e["path"] for e in listed] == ["sub/b.bin"]


def test_a_negative_wait_is_refused(tmp_path, cli, setup):
    repo, _ = setup
    proc = cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "t"), "--wait", "-1", check=2)
    assert b"--wait: must be a finite number, 0 or more: -1.0" in proc.stderr
    for bad in ("nan", "inf", "1e400"):
        proc = cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "t"), "--wait", bad, check=2)
        assert b"--wait: must be a finite number, 0 or more" in proc.stderr


def test_two_key_removals_at_once_cannot_remove_every_key(tmp_path, new_repo, password):
    """Each opened with its own key removes the other's: the second, once the first is done, finds its own key
    gone and removes nothing (without the lock both went through and no key opened the repository again)."""
    from chunkvault import Repository
    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    repo = new_repo(str(tmp_path / "repo"))
    second = repo.add_key("second password", kdf_seconds=0)
    first = repo.store.key_name
    with Repository.open(str(tmp_path / "repo"), "second password") as other:
        with RepoLock(repo.store.remote, EXCLUSIVE, "key remove"):  # the other's removal is under way
            with pytest.raises(Locked, match="lock.*key remove"):
                other.remove_key(first, wait=0)
        repo.remove_key(second)
        with pytest.raises(UsageError, match="opened with is gone"):
            other.remove_key(first)
    with Repository.open(str(tmp_path / "repo"), password) as again:
        assert [k["id"] for k in again.keys()] == [first]
        with pytest.raises(UsageError, match="refusing to remove the key this repository was opened with"):
            again.remove_key(first)


def test_key_remove_and_passwd_wait_for_running_backups(tmp_path, new_repo, cli, password):
    """As the other commands that take the exclusive lock: they wait for a backup's lock (--wait 0
    refuses at once, the password unchanged), and go on once it is gone."""
    import threading

    from chunkvault import Repository
    from chunkvault.store.locks import SHARED, RepoLock

    repo = new_repo(str(tmp_path / "repo"))
    r = str(tmp_path / "repo")
    extra = repo.add_key("extra password", kdf_seconds=0)
    (tmp_path / "new").write_text("new password\n")
    passwd = ("key", "passwd", "-r", r, "--new-password-file", str(tmp_path / "new"), "--kdf-time", "0")
    lock = RepoLock(repo.store.remote, SHARED, "backup")
    with lock:
        refused = cli("key", "remove", "-r", r, extra[:12], "--wait", "0", check=15).stderr
        assert b"locked by backup" in refused and refused.rstrip().endswith(b"try again later or use --wait")
        said = cli("key", "remove", "-r", r, extra[:12], "--wait", "0.5", check=15).stderr
        assert b"waited 0.5 s; try again later" in said and b"use --wait" not in said
        said = cli(*passwd, "--wait", "0", check=15).stderr  # the hint stays with its sentence
        assert said.rstrip().endswith(b"try again later or use --wait; the password is unchanged")
        threading.Timer(1.0, lock.release).start()
        cli("key", "remove", "-r", r, extra[:12])
    cli(*passwd)
    with Repository.open(r, "new password") as changed:
        assert len(changed.keys()) == 1
    with pytest.raises(WrongPassword):
        Repository.open(r, password)


def test_a_refused_password_change_leaves_no_generated_secret_and_removals_name_their_key(tmp_path, new_repo, cli):
    """The secret file of a `passwd --generate-secret` refused for the lock stayed, opening nothing, and a retry
    refused it as existing; `key remove PREFIX` reported the prefix, and "no unique key" was said alike of
    a prefix nothing has and of one two keys share."""
    from chunkvault.store.locks import SHARED, RepoLock

    repo = new_repo(str(tmp_path / "repo"))
    r, secret = str(tmp_path / "repo"), tmp_path / "secret"
    with RepoLock(repo.store.remote, SHARED, "backup"):
        err = cli("key", "passwd", "-r", r, "--generate-secret", str(secret), "--wait", "0", check=15).stderr
    assert b"the password is unchanged" in err and not secret.exists()
    ids = [repo.add_key(f"pw {i}", kdf_seconds=0) for i in range(16)]  # 17 keys: two share a first digit
    first = Counter(k[0] for k in ids + [repo.store.key_name]).most_common(1)[0][0]
    shared = [k for k in ids + [repo.store.key_name] if k[0] == first]
    err = cli("key", "remove", "-r", r, first, check=12).stderr.decode()
    assert f"key '{first}' is ambiguous: " in err and all(k[:12] in err for k in shared)
    assert b"no key 'zz'" in cli("key", "remove", "-r", r, "zz", check=12).stderr  # as an unknown snapshot
    out = json.loads(cli("key", "remove", "-r", r, ids[1][:6], "--json").stdout)
    assert out == {"removed": ids[1]}


def test_a_key_named_in_full_is_removed_though_another_name_starts_with_it(tmp_path, new_repo, cli):
    """A copy of a key file kept beside it (``keys/ID.bak``) made ``key remove ID``, the full id, ambiguous, and
    the refusal named both by the same twelve characters: neither could be named at all."""
    repo = new_repo(str(tmp_path / "repo"))
    r = str(tmp_path / "repo")
    other = repo.add_key("other password", kdf_seconds=0)
    keys = tmp_path / "repo" / "keys"
    (keys / f"{other}.bak").write_bytes((keys / other).read_bytes())
    err = cli("key", "remove", "-r", r, other[:12], check=12).stderr.decode()
    assert f"is ambiguous: {other}, {other}.bak" in err
    lines = cli("key", "list", "-r", r).stdout.decode().splitlines()
    listed = " ".join(lines).split()
    assert other in listed and f"{other}.bak" in listed and repo.store.key_name[:12] in listed  # each names one
    assert len({len(line) - len(line[2:].split(None, 1)[1]) for line in lines}) == 1  # the columns line up
    (keys / f"{other}.bak").write_bytes(b"damaged")
    listed = cli("key", "list", "-r", r).stdout.decode()
    assert f"(`key remove {other}.bak`)" in listed
    checked = cli("check", "-r", r, check=False)
    assert f"`key remove {other}.bak` removes it" in (checked.stdout + checked.stderr).decode()
    assert json.loads(cli("key", "remove", "-r", r, other, "--json").stdout) == {"removed": other}
    assert sorted(p.name for p in keys.iterdir()) == sorted([repo.store.key_name, f"{other}.bak"])
    assert json.loads(cli("key", "remove", "-r", r, f"{other}.bak", "--json").stdout) == {"removed": f"{other}.bak"}


def test_no_second_key_is_added_for_one_password_so_a_password_change_retires_it(tmp_path, new_repo, cli):
    """`key add` made a second key for a password a key had already: `key passwd` with that password replaced the
    key it opened with and said the password was changed, while the other key still opened with the old one."""
    repo = new_repo(str(tmp_path / "repo"))
    r = str(tmp_path / "repo")
    (tmp_path / "other").write_text("other password\n")
    (tmp_path / "new").write_text("new password\n")
    add = ("key", "add", "-r", r, "--new-password-file", str(tmp_path / "other"), "--kdf-time", "0")
    added = json.loads(cli(*add, "--json").stdout)
    other = added["id"]
    assert added == {"id": other, "added": True}
    out = cli(*add).stdout.decode().strip()
    assert out == f"key {other[:12]} opens with this password already: nothing added (`key passwd` changes it)"
    found = json.loads(cli(*add, "--json", env={"CHUNKVAULT_PASSWORD": "other password"}).stdout)
    assert found == {"id": other, "added": False}
    assert len(repo.keys()) == 2
    cli("key", "passwd", "-r", r, "--new-password-file", str(tmp_path / "new"), "--kdf-time", "0",
        env={"CHUNKVAULT_PASSWORD": "other password"})
    assert b"wrong password" in cli("snapshots", "-r", r, env={"CHUNKVAULT_PASSWORD": "other password"},
                                    check=11).stderr
    cli("snapshots", "-r", r, env={"CHUNKVAULT_PASSWORD": "new password"})


def test_a_password_changed_to_one_an_older_key_has_keeps_that_key_and_adds_none(tmp_path, new_repo, password):
    """A change to the password of a key older than the one changed added a second key for it (only a newer key,
    what a stopped change leaves, was looked for): a change of that password later left the other opening."""
    from chunkvault import Repository

    repo = new_repo(str(tmp_path / "repo"))
    first = repo.store.key_name
    repo.add_key("second", kdf_seconds=0)
    with Repository.open(str(tmp_path / "repo"), "second") as other:
        assert other.change_password(password, kdf_seconds=0)[0] == first
    assert [k["id"] for k in repo.keys()] == [first]
    with Repository.open(str(tmp_path / "repo"), password) as again:
        again.change_password("third", kdf_seconds=0)
    with pytest.raises(WrongPassword):
        Repository.open(str(tmp_path / "repo"), password)


def test_two_password_changes_at_once_tell_the_loser_what_opens_the_repository(tmp_path, new_repo, password):
    """Both opened with one key and each replaced it: the second found it gone, but said "no unique key"
    and "the password is unchanged", while the old password opened nothing any more."""
    from chunkvault import Repository

    repo = new_repo(str(tmp_path / "repo"))
    with Repository.open(str(tmp_path / "repo"), password) as other:
        new, _ = repo.change_password("first's new", kdf_seconds=0)
        with pytest.raises(UsageError, match="the key this repository was opened with is gone .* nothing changed; "
                                             "use the password that command set"):
            other.change_password("second's new", kdf_seconds=0)
        assert [k["id"] for k in repo.keys()] == [new]  # the loser stored no key


def test_copy_into_its_own_repository_is_refused(tmp_path, cli, setup):
    repo, src = setup
    cli("backup", "-r", repo, str(src))
    from conftest import PASSWORD

    proc = cli("copy", "-r", repo, "--to", repo, env={"CHUNKVAULT_TO_PASSWORD": PASSWORD}, check=2)
    assert b"has this repository's id" in proc.stderr
    assert len(json.loads(cli("snapshots", "-r", repo, "--json").stdout)) == 1


@pytest.mark.parametrize("extra", [["--generate-secret", "{dir}/secret", "--password-file", "{dir}/pw"],
                                   ["--copy-chunker-params-from", "{dir}/other", "--chunk-avg", "1M"]])
def test_init_refuses_options_that_contradict_each_other(tmp_path, cli, extra):
    """Not one of them silently ignored (a password that then opens nothing, a chunk size not used)."""
    (tmp_path / "pw").write_text("password\n")
    proc = cli("init", "-r", str(tmp_path / "repo"), "--kdf-time", "0", *(a.format(dir=tmp_path) for a in extra),
               check=2)
    assert b"give" in proc.stderr and not (tmp_path / "repo").exists() and not (tmp_path / "secret").exists()


def test_json_snapshot_paths_that_are_not_utf8_carry_their_bytes(tmp_path, cli):
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo)
    raw = os.fsencode(tmp_path) + b"/d\xff"
    os.mkdir(raw)
    with open(raw + b"/f", "wb") as f:
        f.write(b"x")
    plain = tmp_path / "plain"
    plain.mkdir()
    for where in (raw, os.fsencode(plain)):
        cli("backup", "-r", repo, os.fsdecode(where))
    shown = {s["paths"][0]: s for s in json.loads(cli("snapshots", "-r", repo, "--json").stdout)}
    assert [base64.b64decode(p) for p in shown[os.fsdecode(raw)]["paths_b64"]] == [raw]
    assert "paths_b64" not in shown[str(plain)]
    (found,) = json.loads(cli("find", "-r", repo, "f", "--json").stdout)
    assert [base64.b64decode(p) for p in found["paths_b64"]] == [raw]


def test_a_stop_signal_that_native_code_wraps_in_its_own_error_still_ends_as_a_stop(tmp_path):
    """SIGTERM landing inside an import (C code) came out as ImportError or RuntimeError: an internal error,
    exit 1. A command stopped by a signal exits 143 (130 for Ctrl-C) whatever the error it unwinds as."""
    import subprocess
    import sys

    program = """
import os, signal, sys, time
import chunkvault.cli as cli
def command(args):
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    except BaseException as exc:  # as C code importing a module does
        raise RuntimeError("Error calling __set_name__") from exc
cli.cmd_snapshots = command
sys.exit(cli.main(["snapshots", "-r", sys.argv[1], "--json"]))
"""
    proc = subprocess.run([sys.executable, "-c", program, str(tmp_path / "none")], capture_output=True, timeout=60)
    assert (proc.returncode, proc.stderr.strip()) == (143, b"chunkvault: terminated"), proc.stderr
    assert json.loads(proc.stdout)["error"]["type"] == "Terminated"


def test_a_thread_left_retrying_by_a_second_stop_signal_gives_up_within_the_grace(tmp_path):
    """A second SIGTERM ended the command's wait for a worker still retrying; the command then cleared the
    stop request on its way out, and the worker went back to retrying for minutes, the process with it,
    printing raw warnings. The worker now gives up within the stop's grace, silently."""
    import subprocess
    import sys

    program = """
import os, signal, sys, threading, time
import chunkvault.cli as cli
from chunkvault.errors import ChunkvaultError, RemoteUnavailable
from chunkvault.remotes.layer import RetryingRemote, stop_request

stop_request.grace = 0.5

class Down:
    display_url, fork_safe, cheap_ranges = "down://", True, True

    def get(self, key, start=None, length=None):
        raise RemoteUnavailable("connection refused")

def work():
    try:
        RetryingRemote(Down(), attempts=100000, max_delay=0.2, timeout=None, verify_reads=False).get("data/x")
    except ChunkvaultError as exc:
        print(exc, file=sys.stderr)

def command(args):
    worker = threading.Thread(target=work)
    worker.start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # the second: the wait for the worker ends as well
        worker.join()

cli.cmd_snapshots = command
sys.exit(cli.main(["snapshots", "-r", sys.argv[1]]))
"""
    proc = subprocess.run([sys.executable, "-c", program, str(tmp_path / "none")], capture_output=True, timeout=60)
    assert proc.returncode == 143, proc.stderr
    lines = proc.stderr.decode().splitlines()
    assert "chunkvault: terminated" in lines and not any("RemoteRetryWarning" in line for line in lines), lines
    assert "the command was told to stop" in lines[-1], lines


@pytest.mark.parametrize("after_delete", [False, True])
def test_a_password_change_stopped_says_which_passwords_open_the_repository(tmp_path, new_repo, password, monkeypatch,
                                                                            capsys, after_delete):
    """Stopped with the new key added: it is taken back; stopped once the old key was removed, only the new
    one opens the repository, and the warning says so (it said both, and a user who kept only the old lost
    the repository)."""
    from chunkvault import Repository, cli
    from chunkvault.remotes.local import LocalRemote

    repo = new_repo(str(tmp_path / "repo"))
    (tmp_path / "new").write_text("new password\n")
    old, real = repo.store.key_name, LocalRemote.delete

    def stopped(self, key):
        if key == f"keys/{old}":
            if after_delete:
                real(self, key)
            raise KeyboardInterrupt
        real(self, key)

    monkeypatch.setattr(LocalRemote, "delete", stopped)
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", password)
    code = cli.main(["key", "passwd", "-r", str(tmp_path / "repo"), "--new-password-file", str(tmp_path / "new"),
                     "--kdf-time", "0"])
    assert code == 130
    err = capsys.readouterr().err
    if after_delete:
        assert "only the new password opens the repository" in err
        with pytest.raises(WrongPassword):
            Repository.open(repo.store.remote.display_url, password)
        Repository.open(repo.store.remote.display_url, "new password").close()
    else:  # the new key is taken back: it said both passwords open the repository, and both did
        assert "stopped: the password is unchanged" in err
        Repository.open(repo.store.remote.display_url, password).close()
        with pytest.raises(WrongPassword):
            Repository.open(repo.store.remote.display_url, "new password")


def test_json_warnings_naming_a_name_that_is_not_utf8_carry_their_bytes(tmp_path, cli, setup):
    repo, src = setup
    odd = os.path.join(os.fsencode(src), b"late-\xff")
    with open(odd, "wb") as f:
        f.write(b"x")
    os.utime(odd, ns=(10**19, 10**19))  # after 2262: stored as that end, with a warning naming the file
    out = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)
    (warning,) = [w for w in out["warnings"] if "2262" in w]
    (raw,) = [base64.b64decode(b) for w, b in zip(out["warnings"], out["warnings_b64"]) if w == warning]
    assert odd in raw and os.fsencode(warning) == raw
    plain = json.loads(cli("backup", "-r", repo, str(src / "sub"), "--json").stdout)
    assert "warnings_b64" not in plain


def test_latest_of_one_source_for_ls_dump_diff_and_verify_restore(tmp_path, cli, setup):
    """With a stream and a directory in one repository, ``latest`` alone is whichever came last: --path
    (and --host) pick one source's newest, as restore and export take them."""
    repo, src = setup
    first_dir = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)["id"]
    (src / "a.txt").write_text("beta\n")
    cli("backup", "-r", repo, str(src))
    cli("backup", "-r", repo, "--stdin", "--stdin-name", "app.sql", input=b"select 1;\n")
    assert cli("dump", "-r", repo, "latest", "a.txt", check=2).returncode == 2  # latest is the stream
    assert cli("dump", "-r", repo, "latest", "a.txt", "--path", str(src)).stdout == b"beta\n"
    assert cli("dump", "-r", repo, "latest", "app.sql", "--path", "app.sql").stdout == b"select 1;\n"
    listed = json.loads(cli("ls", "-r", repo, "latest", "--path", str(src), "--json").stdout)
    assert "sub/b.bin" in {e["path"] for e in listed}
    changed = json.loads(cli("diff", "-r", repo, first_dir, "latest", "--path", str(src), "--json").stdout)
    assert [(c["change"], c["path"]) for c in changed] == [("modified", "a.txt")]
    verified = json.loads(cli("verify-restore", "-r", repo, "--path", str(src), "--json").stdout)
    assert verified["ok"] and verified["snapshots"][0]["files"] == 2
    missing = cli("ls", "-r", repo, "latest", "--host", "nohost", check=12)
    assert "no snapshot of host nohost" in missing.stderr.decode()


def test_api_errors_read_without_options_and_the_command_line_names_its_own(tmp_path, new_repo, cli):
    """A message worded for every caller; the command line adds the option that would have helped."""
    repo = new_repo(str(tmp_path / "repo"))
    r = str(tmp_path / "repo")
    with pytest.raises(UsageError) as api:
        repo.backup_stream(io.BytesIO(b"x"), "../up")
    assert "--" not in str(api.value) and api.value.cli_hint == " (--stdin-name)"
    said = cli("backup", "-r", r, "--stdin", "--stdin-name", "../up", input=b"x", check=2).stderr.decode().strip()
    assert said == "chunkvault: invalid stream name '../up': a relative path without . or .. in it (--stdin-name)"
    said = cli("check", "-r", r, "--read-data-subset", "4/3", check=2).stderr.decode().strip()
    assert said.endswith("or a size like 500M (--read-data-subset)")


def test_latest_with_a_filter_is_the_newest_of_what_the_filter_selects(tmp_path, cli):
    """`tag latest --path DB --add pinned` took the repository's latest (another source's), which the filter
    then left out: it pinned nothing and said it had changed 0 snapshots, exit 0 (copy, stats and rewrite
    alike), and a later `forget --keep-tag pinned` removed the snapshot meant to be kept."""
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    db, web = tmp_path / "db", tmp_path / "web"
    for d in (db, web):
        d.mkdir()
        (d / "f").write_text(d.name)
    db_id = json.loads(cli("backup", "-r", repo, str(db), "--json").stdout)["id"]
    web_id = json.loads(cli("backup", "-r", repo, str(web), "--json").stdout)["id"]
    cli("tag", "-r", repo, "latest", "--path", str(db), "--add", "pinned")
    tags = {s["id"]: s["tags"] for s in json.loads(cli("snapshots", "-r", repo, "--json").stdout)}
    assert tags == {db_id: ["pinned"], web_id: []}
    usage = json.loads(cli("stats", "-r", repo, "latest", "--path", str(db), "--json").stdout)
    assert usage["snapshots"] == 1
    other = str(tmp_path / "other")
    cli("init", "-r", other, "--kdf-time", "0")
    cli("copy", "-r", repo, "--to", other, "latest", "--path", str(db), env={"CHUNKVAULT_TO_PASSWORD": PASSWORD})
    assert [s["paths"] for s in json.loads(cli("snapshots", "-r", other, "--json").stdout)] == [[str(db)]]
    refused = cli("tag", "-r", repo, web_id[:8], "--path", str(db), "--add", "x", check=12)
    assert b"is not among those the host, tag and path filters select" in refused.stderr
    # a newer snapshot of db and web together includes db: latest --path db is still db's own, as restore
    # takes it (tag pinned the other, and a forget --keep-tag pinned could remove the one a restore took)
    both_id = json.loads(cli("backup", "-r", repo, str(db), str(web), "--json").stdout)["id"]
    cli("tag", "-r", repo, "latest", "--path", str(db), "--add", "again")
    tags = {s["id"]: s["tags"] for s in json.loads(cli("snapshots", "-r", repo, "--json").stdout)}
    assert tags[db_id] == ["pinned", "again"] and tags[both_id] == []
    restored = json.loads(cli("restore", "-r", repo, "latest", "--path", str(db), "--target", str(tmp_path / "r"),
                              "--json").stdout)
    assert restored["snapshot"] == db_id


def test_a_rate_past_a_float_is_not_a_rate_and_debug_shows_a_failure_while_parsing(tmp_path, cli, monkeypatch):
    """1e999 KiB/s overflowed to an internal error (exit 1); and --debug showed no traceback for an internal
    error met while the arguments were parsed (they were not parsed yet to say --debug)."""
    from chunkvault import cli as cli_module

    said = cli("snapshots", "-r", str(tmp_path / "none"), "--limit-upload", "1e999", check=2).stderr
    assert said.decode().strip().endswith("not a rate: '1e999' (KiB per second, e.g. 512, or 2M)")

    def broken(text):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli_module, "_rate", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli_module.main(["snapshots", "-r", str(tmp_path / "none"), "--limit-upload", "1", "--debug"])
    assert cli_module.main(["snapshots", "-r", str(tmp_path / "none"), "--limit-upload", "1"]) == 1
