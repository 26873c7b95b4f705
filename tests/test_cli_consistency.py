"""The command line and the Python API agree with each other and with the README: exit codes, one-line
usage errors, --json on stdout, options each command documents and applies."""
import base64
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from chunkvault import Repository
from chunkvault.errors import TargetNotEmpty, UsageError
from conftest import PASSWORD
from test_corruption import flip
from test_damaged_storage import chunk_ids, damage_blob
from treeutil import settle
from walsegments import write_segment

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def setup(tmp_path, cli):
    """A repository with one snapshot of a small tree."""
    repo = str(tmp_path / "repo")
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.txt").write_text("beta\n")
    cli("init", "-r", repo, "--kdf-time", "0")
    settle()  # for a backup after this one to take the tree unread
    cli("backup", "-r", repo, str(src), "--tag", "nightly")
    return repo, src


def one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    """The stderr of a command that failed with ``code``: one line, no traceback."""
    assert proc.returncode == code, proc.stderr.decode()
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    return err


def exit_codes() -> dict[str, str]:
    table = README.read_text().split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    return dict(re.findall(r"^\| (\d+) \| (.*) \|$", table, re.M))


# --- exit codes ---------------------------------------------------------------------------------------


def test_exit_code_table_names_how_restore_overwrites(setup, cli, tmp_path):
    repo, _ = setup
    codes = exit_codes()
    assert "--confirm RESTORE" in codes["16"] and "--force" not in codes["16"] and "force=True" in codes["16"]
    assert "export" in codes["17"] and "interrupted" in codes["130"]
    target = tmp_path / "full"
    target.mkdir()
    (target / "x").write_text("x")
    err = one_line_error(cli("restore", "-r", repo, "latest", "--target", str(target), check=False), 16)
    assert "--confirm RESTORE" in err


def test_every_exit_code_the_command_can_return_is_in_the_table():
    """Each error class's code, the signals' (128 + the signal) and archive-get's fatal code, documented."""
    import signal

    from chunkvault import errors
    from chunkvault.walfetch import FATAL_EXIT

    raised = {cls.exit_code for cls in vars(errors).values()
              if isinstance(cls, type) and issubclass(cls, (errors.ChunkvaultError, errors.Stopped))}
    signalled = {128 + s for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGTERM)}
    assert {0} | raised | signalled | {FATAL_EXIT} == {int(code) for code in exit_codes()}


def test_help_gives_the_defaults_the_options_take():
    """A number --help gives as an option's default (``default 3600``) is the value the option takes unset."""
    import argparse

    from chunkvault.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    checked = 0
    for parser in parsers(build_parser()):
        for action in parser._actions:
            said = re.search(r"\(default:? (-?\d+(?:\.\d+)?)[;)]", " ".join((action.help or "").split()))
            if said and isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
                assert float(said[1]) == action.default, (parser.prog, action.option_strings)
                checked += 1
    assert checked > 20


def test_api_target_not_empty_names_the_keyword(setup, tmp_path, password):
    repo, _ = setup
    target = tmp_path / "full"
    target.mkdir()
    (target / "x").write_text("x")
    with Repository.open(repo, password) as r, pytest.raises(TargetNotEmpty) as info:
        r.restore("latest", str(target))
    assert "force=True" in str(info.value) and "--force" not in str(info.value)


def test_not_an_export_file_exits_17_as_documented(setup, cli, tmp_path):
    repo, _ = setup
    junk = tmp_path / "junk"
    junk.write_text("not an export\n")
    one_line_error(cli("import", "-r", repo, str(junk), env={"CHUNKVAULT_EXPORT_PASSWORD": "x"}, check=False), 17)


# --- init settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("option", [["--chunk-avg", "1000"], ["--chunk-avg", "300K"], ["--chunk-avg", "64M"],
                                    ["--compression", "99"], ["--compression", "-1"], ["--full-every", "-1"],
                                    ["--kdf-time", "-1"], ["--max-diff-share", "5"]])
def test_init_refuses_impossible_settings_as_usage_errors(tmp_path, cli, option):
    repo = tmp_path / "repo"
    err = one_line_error(cli("init", "-r", str(repo), *option, check=False), 2)
    assert option[0] in err
    assert not repo.exists()


def test_init_help_says_what_chunk_avg_takes(cli):
    assert "power of two" in cli("init", "--help").stdout.decode()


@pytest.mark.parametrize("settings", [{"chunker": {"min_size": 250, "avg_size": 1000, "max_size": 8000}},
                                      {"compression_level": 99}, {"full_every": -1}, {"max_diff_share": 5.0},
                                      {"kdf_seconds": -1}, {"pack_size": 0}])
def test_api_init_refuses_impossible_settings_as_usage_errors(tmp_path, settings):
    settings.setdefault("kdf_seconds", 0)
    with pytest.raises(UsageError):
        Repository.init(str(tmp_path / "repo"), "pw", **settings)
    assert not (tmp_path / "repo" / "config").exists()


def test_key_add_refuses_a_negative_kdf_time(setup, cli, tmp_path):
    repo, _ = setup
    new = tmp_path / "new-pw"
    new.write_text("another password\n")
    one_line_error(cli("key", "add", "-r", repo, "--new-password-file", str(new), "--kdf-time", "-1",
                       check=False), 2)


# --- run and daemon apply the remote options -----------------------------------------------------------


@pytest.fixture
def policy(tmp_path, setup):
    repo, src = setup
    path = tmp_path / "policy.toml"
    path.write_text(f'repository = {json.dumps(repo)}\nfull = "hourly"\n\n'
                    f'[[source]]\nname = "data"\npaths = [{json.dumps(str(src))}]\n')
    return path


def test_run_refuses_a_bad_remote_option(policy, cli):
    assert "foo" in one_line_error(cli("run", "--config", str(policy), "-o", "file.foo=bar", check=False), 2)


def test_daemon_stops_on_a_bad_remote_option(policy, cli):
    """It would fail at every slot alike: the daemon ends with the usage error (its log says so first)."""
    proc = cli("daemon", "--config", str(policy), "-o", "file.foo=bar", check=2)
    assert proc.stderr.decode().splitlines()[-1].startswith("chunkvault: unknown option 'foo'")


def test_run_opens_the_repository_with_the_remote_options(policy, password, monkeypatch):
    from chunkvault import cli

    seen: list[dict] = []
    real_open = Repository.open.__func__

    def recording_open(cls, url, pw, **options):
        seen.append(options)
        return real_open(cls, url, pw, **options)

    monkeypatch.setattr(Repository, "open", classmethod(recording_open))
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", password)
    assert cli.main(["run", "--config", str(policy), "-q", "-o", "file.direct-io=no", "--limit-upload", "2M",
                     "--limit-download", "512"]) == 0
    assert seen and all(o.get("limit_upload") == 2 << 20 and o.get("limit_download") == 512 << 10 for o in seen)
    assert all(len(o) == 3 for o in seen)  # and the -o option


# --- --json ---------------------------------------------------------------------------------------------


def test_key_commands_print_one_json_object(setup, cli, tmp_path):
    repo, _ = setup
    new, newer = tmp_path / "new-pw", tmp_path / "newer-pw"
    new.write_text("another password\n")
    newer.write_text("yet another password\n")
    added = json.loads(cli("key", "add", "-r", repo, "--new-password-file", str(new), "--kdf-time", "0",
                           "--json").stdout)
    assert added == {"id": added["id"], "added": True}
    changed = json.loads(cli("key", "passwd", "-r", repo, "--password-file", str(new), "--new-password-file",
                             str(newer), "--kdf-time", "0", "--json", password=None).stdout)
    assert changed["removed"] == added["id"] and changed["id"] != added["id"]
    removed = json.loads(cli("key", "remove", "-r", repo, changed["id"], "--json").stdout)
    assert removed == {"removed": changed["id"]}


@pytest.mark.parametrize("processes", ["1", "2"])
def test_restore_json_lists_the_damaged_files_before_failing(tmp_path, new_repo, password, cli, processes):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(50_000))
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    damage_blob(tmp_path / "repo", repo, chunk_ids(repo, snap, "f2")[0])
    proc = cli("restore", "-r", str(tmp_path / "repo"), snap.id, "--target", str(tmp_path / "out"), "--json",
               "--processes", processes, check=13)
    out = json.loads(proc.stdout)
    assert [d["path"] for d in out["not_restored"]] == ["f2"] and out["files"] == 5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f0", "f1", "f3", "f4", "f5"]


def test_a_failing_restore_prints_its_warnings_before_the_error(tmp_path, new_repo, cli, monkeypatch,
                                                                python_file_reads):
    import errno

    from chunkvault.store import backup

    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(50_000))
    os.link(src / "data", src / "link")
    (src / "unread").write_bytes(b"x")
    repo = new_repo(str(tmp_path / "repo"))
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if os.path.basename(os.fsdecode(path)) == "unread":  # root reads every file: the error is simulated
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(backup.os, "open", failing_open)
    snap = repo.backup([str(src)]).snapshot
    monkeypatch.undo()
    damage_blob(tmp_path / "repo", repo, chunk_ids(repo, snap, "data")[0])
    lines = cli("restore", "-r", str(tmp_path / "repo"), snap.id, "--target", str(tmp_path / "out"),
                check=13).stderr.decode().splitlines()
    assert lines[0] == "warning: unread was unreadable at backup time: not restored (no backup read its data)"
    assert lines[-1].startswith("chunkvault: corrupt object ")
    assert lines[-1].endswith("2 file(s) not restored: data, link (everything else was restored)")


def test_restore_json_of_a_clean_restore_has_an_empty_not_restored(setup, cli, tmp_path):
    repo, _ = setup
    out = json.loads(cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "out"), "--json").stdout)
    assert out["not_restored"] == [] and out["not_written"] == [] and out["files"] == 2
    assert out["verified"] is False


def test_backup_json_says_skipped_and_a_dry_run_has_no_id(setup, cli):
    repo, src = setup
    dry = json.loads(cli("backup", "-r", repo, str(src), "--dry-run", "--json").stdout)
    assert dry["id"] is None and dry["short_id"] is None and dry["skipped"] is False
    skipped = json.loads(cli("backup", "-r", repo, str(src), "--skip-if-unchanged", "--json").stdout)
    assert skipped["skipped"] is True and skipped["id"] is None


# --- times and snapshot ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["restore", "latest", "--target", "{tmp}/t", "--until", "garbage"],
                                  ["restore", "latest", "--target", "{tmp}/t", "--until", "2026-13-45T99:00"],
                                  ["verify-restore", "--all-since", "bogus"]])
def test_an_unparsable_time_is_a_usage_error(setup, cli, args, tmp_path):
    repo, _ = setup
    args = [a.format(tmp=tmp_path) for a in args]
    assert "cannot parse time" in one_line_error(cli(*args, "-r", repo, check=False), 2)


def test_api_unparsable_time_is_a_usage_error(setup, password):
    repo, _ = setup
    with Repository.open(repo, password) as r, pytest.raises(UsageError, match="cannot parse time"):
        r.snapshot("latest", until="garbage")


@pytest.mark.parametrize("args", [["forget", ""], ["tag", "", "--add", "oops"], ["forget", " "],
                                  ["restore", "", "--target", "{tmp}/t"], ["ls", ""], ["dump", "", "a.txt"],
                                  ["aggregate", ""], ["rewrite", "", "--exclude", "a.txt", "--confirm", "REWRITE"]])
def test_an_empty_snapshot_id_is_a_usage_error_and_changes_nothing(setup, cli, args, tmp_path):
    repo, _ = setup
    args = [a.format(tmp=tmp_path) for a in args]
    before = json.loads(cli("snapshots", "-r", repo, "--json").stdout)
    one_line_error(cli(*args, "-r", repo, check=False), 2)
    assert json.loads(cli("snapshots", "-r", repo, "--json").stdout) == before


# --- --wait on every command that waits for the exclusive lock -------------------------------------------------


@pytest.mark.parametrize("args", [["tag", "latest", "--add", "x"], ["rewrite", "--exclude", "a.txt", "--confirm",
                                                                     "REWRITE"], ["repair", "index"],
                                  ["repair", "snapshots", "--confirm", "REPAIR"]])
def test_exclusive_commands_take_the_wait_they_suggest(setup, cli, password, args):
    repo, _ = setup
    with Repository.open(repo, password) as r, r.reading("mount"):
        err = one_line_error(cli(*args, "-r", repo, "--wait", "0", check=False), 15)
    assert "--wait" in err
    cli(*args, "-r", repo, "--wait", "0")


def _damaged_repository(cli, tmp_path) -> str:
    """A repository of one snapshot of one file, whose one pack is damaged."""
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(os.urandom(5000))
    cli("backup", "-r", repo, str(tmp_path / "src"), "-q")
    flip(next(p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()), 100)
    return repo


def test_check_names_every_file_a_problem_takes_down_by_its_bytes(cli, tmp_path):
    """A name with a byte that is no UTF-8 was labelled with backslash escapes, so it and a file whose name
    holds those characters were one label, and one of them went unnamed."""
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(5000)
    for name in (b"n\xffm", b"n\\xffm"):
        with open(os.path.join(os.fsencode(src), name), "wb") as f:
            f.write(data)
    cli("backup", "-r", repo, str(src), "-q")
    flip(next(p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()), 100)
    doc = json.loads(cli("check", "-r", repo, "--read-data", "--json", check=18).stdout)
    named = [problem for problem in doc["problems"] if problem["files"]]
    assert len(named) == 1 and len(named[0]["files"]) == 2
    raw = sorted(base64.b64decode(b).split(b":", 1)[1] for b in named[0]["files_b64"])
    assert raw == sorted([b"n\xffm", b"n\\xffm"])
    text = cli("check", "-r", repo, "--read-data", check=18).stdout.decode()
    assert "affects file " in text and text.count("n\\xffm") == 1 and text.count("n\\\\xffm") == 1


def test_an_internal_error_under_json_still_prints_the_error_document(monkeypatch, capsys, tmp_path):
    """A bug (exit 1) left standard output empty where --json promises a document."""
    from chunkvault import cli as command_line

    def broken(args):
        raise ValueError("a bug")

    monkeypatch.setattr(command_line, "cmd_snapshots", broken)
    assert command_line.main(["snapshots", "-r", str(tmp_path), "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["error"] == {"type": "InternalError", "exit_code": 1, "message":
                                        "internal error: ValueError: a bug (rerun with --debug for details)"}
    assert err == "chunkvault: internal error: ValueError: a bug (rerun with --debug for details)\n"


def test_a_dump_that_fails_once_its_data_began_adds_no_json_to_it(monkeypatch, capfdbinary, tmp_path, cli):
    """The error document was appended to the half-written file or archive on standard output."""
    from chunkvault import Repository
    from chunkvault import cli as command_line
    from chunkvault.errors import CorruptObject

    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"data")
    cli("backup", "-r", repo, str(tmp_path / "src"), "-q")

    def failing(self, snap, path, out, archive="tar", subtree=None):
        out.write(b"half of it")
        raise CorruptObject("data/ab", "damaged")

    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    assert command_line.main(["dump", "-r", repo, "latest", "missing", "--json"]) == 2
    out, _ = capfdbinary.readouterr()
    assert json.loads(out)["error"]["exit_code"] == 2  # nothing written yet: the document
    monkeypatch.setattr(Repository, "dump", failing)
    assert command_line.main(["dump", "-r", repo, "latest", "f", "--json"]) == 13
    out, err = capfdbinary.readouterr()
    assert out == b"half of it" and err.startswith(b"chunkvault: corrupt object data/ab")


def test_quiet_still_names_what_is_wrong(cli, tmp_path):
    """-q prints only errors: `check -q` printed no problem, only its exit code, and `restore -q` left a
    damaged file out without a word."""
    repo = _damaged_repository(cli, tmp_path)
    checked = cli("check", "-r", repo, "--read-data", "-q", check=18)
    assert checked.stdout.decode().startswith("error: ") and b"checked 1 snapshots" not in checked.stdout
    restored = cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "out"), "-q", check=False)
    assert restored.returncode != 0 and b"f" in restored.stderr and restored.stdout == b""


def test_a_report_whose_reader_went_away_is_no_success(cli, tmp_path):
    """`check --read-data | true` exited 0 where the check found damage (18): a closed pipe was taken for
    a reader that had what it wanted.  It now ends as `cat` does there."""
    repo = _damaged_repository(cli, tmp_path)
    env = {**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD}
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", "check", "--read-data", "-r", repo],
                          stdout=write, stderr=subprocess.PIPE, env=env, timeout=120)
    os.close(write)
    assert proc.returncode == 141, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr and b"Exception ignored" not in proc.stderr


def test_a_json_document_cut_short_by_its_reader_is_no_success(cli, tmp_path):
    """A document larger than stdout's buffer went to the pipe in one write; its reader leaving during it
    made the write return the part written, the rest was dropped, and `ls --json | head -c 100` exited 0."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2000):
        (src / f"file{i:04}").write_bytes(b"")
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, str(src))
    env = {**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD}
    proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "ls", "-r", repo, "latest", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert len(proc.stdout.read(100)) == 100  # the document's one write has begun
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err.decode()
    assert b"Traceback" not in err


# --- parsing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["-r", "somewhere", "snapshots"], ["--json", "snapshots"]])
def test_options_before_the_command_are_explained(cli, args):
    err = one_line_error(cli(*args, check=False), 2)
    assert "options go after the command: chunkvault snapshots " in err


@pytest.mark.parametrize("args, fixed", [
    (["key", "-r", "elsewhere", "--password-file", "pw", "passwd"], "key passwd -r elsewhere --password-file pw"),
    (["key", "--json", "list"], "key list --json"),
    (["key", "-q"], "key COMMAND -q"),
    (["-r", "R", "key", "list"], "key list -r R"),
])
def test_options_between_key_and_its_command_are_explained_not_dropped(cli, args, fixed):
    """They were parsed, then replaced by the subcommand's defaults: `key -r B passwd` changed the password
    of the repository the environment named."""
    err = one_line_error(cli(*args, check=False), 2)
    assert err == f"chunkvault: options go after the command: chunkvault {fixed}\n"


@pytest.mark.parametrize("args, fixed", [
    (["-o", "http.token=S3CRET", "snapshots"], "snapshots -o http.token=TOKEN"),
    (["-r", "sftp://backup:S3CRET@vault/repo", "snapshots"], "snapshots -r sftp://backup:PASSWORD@vault/repo"),
    (["--password-command", "pass show backup", "snapshots"], "snapshots --password-command 'pass show backup'"),
])
def test_the_line_shown_for_options_before_the_command_hides_secrets_and_quotes_words(cli, args, fixed):
    """The line was the words joined by spaces: a token or a URL's password went to stderr (a cron mail, a
    log), and a word with a space in it was shown as several."""
    err = one_line_error(cli(*args, check=False), 2)
    assert err == f"chunkvault: options go after the command: chunkvault {fixed}\n"
    assert "S3CRET" not in err


@pytest.mark.parametrize("args, said", [
    (["snapshots", "-o--"], "bad remote option '--': expected SCHEME.NAME=VALUE"),
    (["snapshots", "--progress=--"], "argument --progress: invalid choice: '--'"),
    (["find", "--wait=--", "x"], "argument --wait: not a number: '--'"),
    (["restore", "latest", "--target=--", "--overwrite=--"], "argument --overwrite: invalid choice: '--'"),
    (["dump", "latest", "x", "--archive=--"], "argument --archive: invalid choice: '--'"),
    (["forget", "--group-by=--", "--keep-last=--"], "argument --keep-last: invalid int value: '--'"),
    (["serve", "--path=.", "--max-object-size=--"], "not a size: '--'"),
])
def test_an_option_given_dashes_after_its_equals_sign_takes_them_as_its_value(args, said, capsys, tmp_path,
                                                                              monkeypatch):
    """Python's argparse took ``--opt=--`` for the end of the options and gave the option ``[]``, past its
    type and choices: an internal error (`-o--`, `--cache-dir=--`, `--target=--`, `--group-by=--`), an option
    silently unset (`--progress=--`), or a message saying ``[]``."""
    from chunkvault import cli as command_line

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHUNKVAULT_REPOSITORY", str(tmp_path / "none"))
    code = command_line.main(args)
    err = capsys.readouterr().err
    assert (code, err.count("\n")) == (2, 1) and said in err and "[]" not in err, err


def test_a_missing_key_subcommand_names_the_choices(cli):
    assert "{list,add,remove,passwd,export,import}" in one_line_error(cli("key", check=False), 2)


def test_a_missing_or_unknown_repair_names_the_choices_and_no_pack(cli):
    """It said "the following arguments are required: what, PACK", the parser's inner name and the packs only
    `repair packs` takes, and "argument what: invalid choice"."""
    missing = one_line_error(cli("repair", check=False), 2)
    assert missing == "chunkvault: the following arguments are required: {index,packs,snapshots,wal}\n"
    unknown = one_line_error(cli("repair", "indx", check=False), 2)
    assert unknown.startswith("chunkvault: argument {index,packs,snapshots,wal}: invalid choice: 'indx'"), unknown


def test_ls_of_a_path_the_snapshot_lacks_fails_as_dump_does(setup, cli):
    repo, _ = setup
    ls = one_line_error(cli("ls", "-r", repo, "latest", "no/such/dir", check=False), 2)
    dump = one_line_error(cli("dump", "-r", repo, "latest", "no/such/dir", check=False), 2)
    assert ls == dump
    assert [e["path"] for e in json.loads(cli("ls", "-r", repo, "latest", "sub", "--json").stdout)] == [
        "sub", "sub/b.txt"]


def test_serve_help_states_the_token_minimum(cli):
    assert "at least 16" in " ".join(cli("serve", "--help").stdout.decode().split())
    assert "at least 16 printable ASCII characters" in " ".join(README.read_text().split())


# --- the Python API ---------------------------------------------------------------------------------------------


def test_api_takes_a_single_string_as_one_item(setup, tmp_path, password):
    repo, _ = setup
    with Repository.open(repo, password) as r:
        assert len(r.snapshots(tags="nightly")) == len(r.snapshots(tags=["nightly"])) == 1
        one = r.restore("latest", str(tmp_path / "one"), includes="sub/*")
        listed = r.restore("latest", str(tmp_path / "listed"), includes=["sub/*"])
        assert one.files == listed.files == 1
        assert [f.path for f in r.find("b.txt")] == [f.path for f in r.find(["b.txt"])] != []
        assert [s.id for s in r.tag("latest", add="pinned")] == [r.snapshot().id]
        assert r.snapshot().tags == ["nightly", "pinned"]


def test_api_bad_open_arguments_are_usage_errors(setup, password):
    repo, _ = setup
    with pytest.raises(UsageError):
        Repository.open(repo, None)
    with pytest.raises(UsageError):
        Repository.open(repo, password, limit_upload=-1)


def readme_example() -> str:
    return README.read_text().split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_example_runs_top_to_bottom(tmp_path):
    """The README's example, run as written with every absolute path placed under a scratch directory and a
    stand-in pg_dump on PATH."""
    root = tmp_path / "root"
    for d in ("var/lib/db", "var/backups/pg/copy/base", "home/u", "etc/nginx"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/db/table").write_bytes(os.urandom(70_000))
    (root / "var/backups/pg/copy/base/1").write_bytes(os.urandom(30_000))
    (root / "home/u/notes.tmp").write_text("left out\n")
    (root / "etc/nginx/nginx.conf").write_text("worker_processes 1;\n")
    (root / "var/lib/postgresql/15/main/pg_wal").mkdir(parents=True)
    write_segment(root / "var/lib/postgresql/15/main/pg_wal", "000000010000000000000003", size=1 << 20)
    (root / "srv/backup").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "dump.sql").write_text("CREATE TABLE t (x int);\n")
    with tarfile.open(work / "etc.tar.gz", "w:gz") as tar:  # as `tar -czf etc.tar.gz /etc` names its members
        tar.add(root / "etc", arcname="etc")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pg_dump").write_text("#!/bin/sh\necho \"-- dump of $1\"\n")
    (bin_dir / "pg_dump").chmod(0o755)
    code = re.sub(r'"/(?=\w)', f'"{root}/', readme_example())
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    settle()  # its second backup of /etc is skipped: nothing to read again
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (root / "tmp/restore/base/1").exists() and (root / "tmp/then/table").exists()
    assert (work / "etc.tar").stat().st_size > 0
    assert (root / "tmp/seg").read_bytes() == (root / "var/lib/postgresql/15/main/pg_wal/000000010000000000000003"
                                               ).read_bytes()
    assert proc.stdout.rstrip().endswith("True")  # verify_restore's report
    assert "\n(0, {})\n" in proc.stdout  # wal_history: timeline 1 archived, but no history file


def json_row(command: str) -> str:
    """The README's JSON output table row of ``command``, as written in its first column."""
    table = README.read_text().split("### JSON output", 1)[1].split("\n\n", 3)[2]
    rows = dict(re.findall(r"^\| (`[^|]*`) \| (.*) \|$", table, re.M))
    return rows[command]


def test_json_documents_name_only_the_keys_the_readme_gives(setup, cli, tmp_path):
    """Each top-level key of these commands' documents is in the command's row of the README's table."""
    repo, src = setup
    (src / "c.txt").write_text("gamma\n")
    cli("backup", "-r", repo, str(src))
    documents = {
        "`stats SNAPSHOT...`": ["stats", "latest"], "`forget`": ["forget", "--keep-last", "1", "--dry-run"],
        "`prune`": ["prune", "--dry-run"], "`check`": ["check"], "`archive-list`": ["archive-list"],
        "`config`": ["config"], "`restore`": ["restore", "latest", "--target", str(tmp_path / "out")],
    }
    for row, args in documents.items():
        keys = json.loads(cli(*args, "-r", repo, "--json").stdout).keys()
        named = set(re.findall(r"`(\w+)`", json_row(row)))
        assert [k for k in keys if k not in named and not k.startswith("manifest_")] == [], row


def test_ls_and_find_show_file_times_in_local_time_as_snapshots_shows_its_times(tmp_path, cli):
    repo = str(tmp_path / "repo")
    src = tmp_path / "data"
    src.mkdir()
    (src / "f").write_text("x")
    os.utime(src / "f", ns=(978_307_200_999_999_999, 978_307_200_999_999_999))  # 2001-01-01 00:00:00.999999999 UTC
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, str(src))
    tokyo = {"TZ": "Asia/Tokyo"}
    assert "2001-01-01 09:00:00  f" in cli("ls", "-r", repo, "latest", env=tokyo).stdout.decode()
    assert "modified 2001-01-01 09:00:00" in cli("find", "-r", repo, "f", env=tokyo).stdout.decode()
    listed = json.loads(cli("ls", "-r", repo, "latest", "--json", env=tokyo).stdout)
    assert listed[1]["mtime"] == "2001-01-01T00:00:00.999999+00:00" and listed[1]["mtime_ns"] == 978_307_200_999_999_999
    assert json.loads(cli("find", "-r", repo, "f", "--json").stdout)[0]["versions"][0]["mtime_ns"] == \
        978_307_200_999_999_999


def test_run_json_with_a_failing_source_is_one_document(tmp_path, setup, cli):
    """Its report, with ok false, and exit 1: not the report and then an error document."""
    repo, _ = setup
    path = tmp_path / "failing.toml"
    path.write_text(f'repository = {json.dumps(repo)}\nfull = "hourly"\n\n'
                    f'[[source]]\nname = "gone"\npaths = [{json.dumps(str(tmp_path / "does-not-exist"))}]\n')
    proc = cli("run", "--config", str(path), "--json", check=False)
    assert proc.returncode != 0
    report = json.loads(proc.stdout)
    assert report["ok"] is False and "error" not in report
    assert json.loads(cli("snapshots", "--json", "--bogus", check=2).stdout)["error"]["exit_code"] == 2
