"""Passwords come from a file, a command, the environment or a policy, by one order, with one-line errors."""
import argparse
import json
import os
import shlex
import subprocess
import sys

import pytest

from chunkvault import Repository, passwords
from chunkvault.errors import UsageError
from conftest import PASSWORD

ENV = ("CHUNKVAULT_PASSWORD", "CHUNKVAULT_PASSWORD_FILE", "CHUNKVAULT_PASSWORD_COMMAND")


def printing(text: str, *, code: int = 0) -> str:
    """A command line that prints ``text`` (and a line break) and exits with ``code``."""
    script = f"import sys; sys.stdout.write({text!r} + chr(10)); sys.exit({code})"
    return shlex.join([sys.executable, "-c", script])


@pytest.fixture
def env(monkeypatch):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"password_file": None, "password_command": None, **kw})


def test_order_options_then_policy_then_environment(env, tmp_path):
    f = tmp_path / "pw"
    f.write_bytes(b"from-file\r\n")
    src = passwords.REPOSITORY
    env.setenv("CHUNKVAULT_PASSWORD", "from-env")
    assert src.given(args()) == b"from-env"
    env.setenv("CHUNKVAULT_PASSWORD_COMMAND", printing("env-command"))
    assert src.given(args()) == b"env-command"  # a command or file named in the environment beats the value
    assert src.given(args(), fallback=(str(f), None)) == b"from-file"  # a policy's beats the environment
    assert src.given(args(password_command=printing("option")), fallback=(str(f), None)) == b"option"
    assert src.given(args(password_file=str(f))) == b"from-file"


def test_a_password_that_is_not_utf8_is_the_same_from_the_environment_and_a_file(cli, tmp_path):
    """The environment's value is taken as its bytes, as a file's are: it was an internal error."""
    raw = b"caf\xe9 pw"
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0", password=None, env={"CHUNKVAULT_PASSWORD": os.fsdecode(raw)})
    (tmp_path / "pw").write_bytes(raw + b"\n")
    cli("snapshots", "-r", repo, "--password-file", str(tmp_path / "pw"), password=None)
    wrong = cli("snapshots", "-r", repo, password=None, env={"CHUNKVAULT_PASSWORD": os.fsdecode(b"caf\xe8 pw")},
                check=11)
    assert wrong.stderr.decode().startswith("chunkvault: wrong password")


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""])
def test_a_password_file_loses_its_line_break_only_its_blanks_are_the_password_s(cli, tmp_path, ending):
    repo = str(tmp_path / "repo")
    (tmp_path / "pw").write_bytes(b" two words " + ending)
    cli("init", "-r", repo, "--kdf-time", "0", "--password-file", str(tmp_path / "pw"), password=None)
    cli("snapshots", "-r", repo, password=None, env={"CHUNKVAULT_PASSWORD": " two words "})
    cli("snapshots", "-r", repo, password=None, env={"CHUNKVAULT_PASSWORD": "two words"}, check=11)


def test_a_password_file_that_never_ends_is_refused_not_read_until_memory_runs_out(env, cli, tmp_path, new_repo):
    """`--password-file /dev/zero` (a mistyped path, a device) hung, reading until memory ran out."""
    with pytest.raises(UsageError, match="^password file /dev/zero holds more than 1 MiB: no password file$"):
        passwords.REPOSITORY.given(args(password_file="/dev/zero"))
    f = tmp_path / "pw"
    f.write_bytes(b"x" * passwords.PASSWORD_FILE_LIMIT)  # as long as a password file may be
    assert passwords.REPOSITORY.given(args(password_file=str(f))) == b"x" * passwords.PASSWORD_FILE_LIMIT
    f.write_bytes(b"x" * (passwords.PASSWORD_FILE_LIMIT + 1))
    with pytest.raises(UsageError, match="holds more than 1 MiB"):
        passwords.REPOSITORY.given(args(password_file=str(f)))
    new_repo(str(tmp_path / "repo"))
    proc = cli("snapshots", "-r", str(tmp_path / "repo"), password=None,
               env={"CHUNKVAULT_PASSWORD_FILE": "/dev/zero"}, check=2)
    assert proc.stderr.decode() == "chunkvault: password file /dev/zero holds more than 1 MiB: no password file\n"


def test_a_file_and_a_command_at_one_level_are_refused(env, tmp_path):
    f = tmp_path / "pw"
    f.write_text("x")
    with pytest.raises(UsageError, match="--password-file and --password-command both given"):
        passwords.REPOSITORY.given(args(password_file=str(f), password_command="true"))
    env.setenv("CHUNKVAULT_PASSWORD_FILE", str(f))
    env.setenv("CHUNKVAULT_PASSWORD_COMMAND", "true")
    with pytest.raises(UsageError, match="CHUNKVAULT_PASSWORD_FILE and _COMMAND both given"):
        passwords.REPOSITORY.given(args())
    assert passwords.REPOSITORY.given(args(password_file=str(f))) == b"x"  # an option settles it


@pytest.mark.parametrize("kind", ["file", "command"])
def test_an_empty_option_is_refused_not_passed_over_for_the_environment(env, kind):
    """`--password-file ""` (an unset shell variable, say) took CHUNKVAULT_PASSWORD instead, silently."""
    env.setenv("CHUNKVAULT_PASSWORD", "from-env")
    with pytest.raises(UsageError, match=f"^--password-{kind} is empty$"):
        passwords.REPOSITORY.given(args(**{f"password_{kind}": ""}))


@pytest.mark.parametrize("kind", ["FILE", "COMMAND"])
def test_an_empty_variable_is_refused_not_passed_over(env, kind, tmp_path):
    """`CHUNKVAULT_PASSWORD_FILE=` (a unit file's unset variable) took CHUNKVAULT_PASSWORD instead."""
    env.setenv("CHUNKVAULT_PASSWORD", "from-env")
    env.setenv(f"CHUNKVAULT_PASSWORD_{kind}", "")
    with pytest.raises(UsageError, match=f"^CHUNKVAULT_PASSWORD_{kind} is set but empty$"):
        passwords.REPOSITORY.given(args())
    (tmp_path / "pw").write_text("option")
    assert passwords.REPOSITORY.given(args(password_file=str(tmp_path / "pw"))) == b"option"  # never looked at


def test_command_output_keeps_its_inner_bytes(env):
    out = passwords.REPOSITORY.given(args(password_command=printing(" two words \t")))
    assert out == b" two words \t"  # only the line break goes: spaces may be part of a password


@pytest.mark.parametrize("command, message", [
    (printing("secret", code=3), "password command `{}` exited 3"),
    ("/nonexistent/vault-client get db", "cannot run password command `{}`: No such file or directory"),
    ("pass show 'db", "cannot parse password command `{}`: No closing quotation"),
    (printing(""), "the repository password from `{}` is empty"),
    ("   ", "empty password command"),
])
def test_command_failures_are_one_line_usage_errors(env, command, message):
    with pytest.raises(UsageError) as e:
        passwords.REPOSITORY.given(args(password_command=command))
    assert str(e.value) == message.format(command)


def test_a_command_that_prints_without_end_is_refused_past_the_limit_of_a_password_file(env):
    """`--password-command yes` (or a command that cats a device) read until memory ran out, as a password
    file of /dev/zero did before its limit."""
    for command in ("yes", "sh -c 'yes | cat'"):
        with pytest.raises(UsageError) as e:
            passwords.REPOSITORY.given(args(password_command=command))
        assert str(e.value) == f"password command `{command}` printed more than 1 MiB: no password"


def test_a_command_that_leaves_a_child_holding_its_output_gives_its_password_when_it_ends(env, tmp_path):
    """A command that starts a process which keeps its standard output (an agent it launches, ``cmd &``) made the
    command wait for that process to end too, the password printed long before."""
    import threading

    release = tmp_path / "release"
    os.mkfifo(release)
    command = f"sh -c 'echo from-command; cat {shlex.quote(str(release))} &'"  # cat waits for the fifo
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(passwords.REPOSITORY.given(args(password_command=command))),
                              daemon=True)
    thread.start()
    thread.join(60)
    try:
        assert got == [b"from-command"]
    finally:
        with open(release, "w"):  # the child ends
            pass
        thread.join()


def test_a_command_killed_by_a_signal_says_so(env):
    with pytest.raises(UsageError, match=r"was killed by signal 9 \(SIGKILL\)"):
        passwords.REPOSITORY.given(args(password_command="sh -c 'kill -9 $$'"))


def test_a_policy_command_runs_in_the_policy_directory(env, tmp_path):
    (tmp_path / "pw").write_text("in-policy-dir\n")
    assert passwords.REPOSITORY.given(args(), fallback=(None, "cat pw"), cwd=str(tmp_path)) == b"in-policy-dir"


def test_without_a_terminal_a_missing_password_names_every_way_to_give_one(env, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    with pytest.raises(UsageError) as e:
        passwords.TO.get(argparse.Namespace())
    assert str(e.value) == ("no password of the to repository: use --to-password-file or --to-password-command, "
                            "or set CHUNKVAULT_TO_PASSWORD_FILE, CHUNKVAULT_TO_PASSWORD_COMMAND or "
                            "CHUNKVAULT_TO_PASSWORD")


def test_a_closed_standard_input_is_no_terminal_to_ask_at(tmp_path):
    """A command started with standard input closed (``<&-``, a service manager's) and no password given
    ended in "internal error: AttributeError" where it asked whether standard input was a terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0).close()
    proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", "snapshots", "-r", str(tmp_path / "repo")],
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                          preexec_fn=lambda: os.close(0), start_new_session=True)
    assert proc.returncode == 2 and proc.stderr.decode().startswith(
        "chunkvault: no repository password: use --password-file or --password-command"), proc.stderr


def test_cli_commands_take_every_password_from_commands(cli, tmp_path):
    """The repository's, a copy destination's and an export's password, each from its own command."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(50_000))
    repo, other = str(tmp_path / "repo"), str(tmp_path / "other")
    by_command = {"CHUNKVAULT_PASSWORD_COMMAND": printing(PASSWORD)}
    cli("init", "-r", repo, "--kdf-time", "0", env=by_command, password=None)
    cli("init", "-r", other, "--kdf-time", "0", "--password-command", printing("other pw"), password=None)
    cli("backup", "-r", repo, str(src), "-q", env=by_command, password=None)
    cli("copy", "-r", repo, "--to", other, "--to-password-command", printing("other pw"), "-q",
        env=by_command, password=None)
    snaps = json.loads(cli("snapshots", "-r", other, "--json", "--password-command", printing("other pw"),
                           password=None).stdout)
    assert len(snaps) == 1
    out = tmp_path / "s.backup"
    cli("export", "-r", repo, "--output", str(out), "--kdf-time", "0", "--export-password-command",
        printing("export pw"), "-q", env=by_command, password=None)
    cli("restore", "--from-file", str(out), "--target", str(tmp_path / "r"),
        "--export-password-command", printing("export pw"), password=None)
    assert (tmp_path / "r" / "f").read_bytes() == (src / "f").read_bytes()
    proc = cli("snapshots", "-r", repo, "--password-command", printing("wrong"), check=11, password=None)
    assert "wrong password" in proc.stderr.decode()


def test_a_password_command_reads_no_data_given_on_standard_input(cli, tmp_path):
    """It inherited the stream of `backup --stdin`: one that read from it (ssh without -n, a `read`) cut
    the data short, and the backup saved the rest with exit 0."""
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    data = os.urandom(300_000)
    eater = shlex.join([sys.executable, "-c",
                        f"import sys; sys.stdin.buffer.read(); print({PASSWORD!r})"])
    cli("backup", "-r", repo, "--stdin", "--stdin-name", "dump.sql", "-q", "--password-command", eater,
        password=None, input=data)
    assert cli("dump", "-r", repo, "latest", "dump.sql").stdout == data


def test_cli_failing_command_is_one_line_and_exit_2(cli, tmp_path):
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    proc = cli("backup", "-r", repo, str(tmp_path), "--password-command", printing("x", code=5), check=2, password=None)
    assert proc.stderr.decode().strip().splitlines() == [
        f"chunkvault: password command `{printing('x', code=5)}` exited 5"]
    assert json.loads(cli("snapshots", "-r", repo, "--json").stdout) == []


def test_policy_password_command(tmp_path, env, capsys):
    from chunkvault.cli import main as cli_main

    src = tmp_path / "data"
    src.mkdir()
    (src / "f").write_text("payload")
    repo = str(tmp_path / "repo")
    env.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    assert cli_main(["init", "-r", repo, "--kdf-time", "0", "-q"]) == 0
    env.delenv("CHUNKVAULT_PASSWORD")
    (tmp_path / "secret").write_text(PASSWORD + "\n")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'full = "daily 02:00"\n[repository]\nurl = "{repo}"\npassword-command = "cat secret"\n'
                      f'[[source]]\nname = "d"\npaths = ["{src}"]\n')
    assert cli_main(["run", "--config", str(policy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"][0]["status"] == "ok"


def test_end_of_input_at_the_prompt_is_no_password(tmp_path):
    """Ctrl-D at the terminal's prompt ended in "internal error: EOFError" (exit 1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_REPOSITORY"] = str(tmp_path / "repo")
    Repository.init(env["CHUNKVAULT_REPOSITORY"], PASSWORD, kdf_seconds=0).close()
    code, said = _answered_at_the_terminal(env, b"\x04")
    assert code == 2
    assert said.decode().splitlines()[-1] == "chunkvault: no repository password: the prompt's input ended"


def _answered_at_the_terminal(env: dict[str, str], typed: bytes) -> tuple[int, bytes]:
    """``chunkvault snapshots`` run on a terminal of its own (its controlling one), ``typed`` at its password
    prompt: its exit code and all it wrote there."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "chunkvault.cli", "snapshots"], env)
    said = b""
    while b"password: " not in said:
        select.select([fd], [], [], 30)
        said += os.read(fd, 4096)
    os.write(fd, typed)
    while True:
        try:
            piece = os.read(fd, 4096)
        except OSError:  # the other end closed
            break
        if not piece:
            break
        said += piece
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), said


@pytest.mark.parametrize("typed", [b"p\xe4ss", "pässwörd".encode()])
def test_the_prompt_takes_the_bytes_typed_as_a_password_file_gives_them(tmp_path, typed):
    """A byte that is not UTF-8 (a Latin-1 terminal's) ended in "internal error: UnicodeDecodeError", though
    the same password in a file or CHUNKVAULT_PASSWORD opened the repository; in the C locale too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHUNKVAULT_", "LC_", "LANG"))}
    env.update(CHUNKVAULT_REPOSITORY=str(tmp_path / "repo"), LC_ALL="C")
    (tmp_path / "pw").write_bytes(typed + b"\n")
    Repository.init(env["CHUNKVAULT_REPOSITORY"], passwords.read_password_file(str(tmp_path / "pw")),
                    kdf_seconds=0).close()
    code, said = _answered_at_the_terminal(env, typed + b"\n")
    assert code == 0, said
    assert said.splitlines()[-1] == b"0 snapshots"


def test_a_terminal_that_is_not_the_controlling_one_is_read_as_bytes_too(tmp_path):
    """Standard input a terminal, but no controlling one (a command started in a session of its own): the
    line was read through getpass and decoded, and a byte that is not UTF-8 ended in an internal error."""
    import pty

    typed = b"p\xe4ss"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHUNKVAULT_", "LC_", "LANG"))}
    # standard input strict UTF-8, as in a UTF-8 locale other than C.UTF-8 (en_US.UTF-8...)
    env.update(CHUNKVAULT_REPOSITORY=str(tmp_path / "repo"), LC_ALL="C.UTF-8", PYTHONIOENCODING="utf-8:strict")
    (tmp_path / "pw").write_bytes(typed + b"\n")
    Repository.init(env["CHUNKVAULT_REPOSITORY"], passwords.read_password_file(str(tmp_path / "pw")),
                    kdf_seconds=0).close()
    master, slave = pty.openpty()
    try:
        with subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "snapshots"], stdin=slave,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True) as p:
            said = b""
            while b"password: " not in said:  # asked on standard error, the terminal's echo turned off
                piece = p.stderr.read1(4096)
                assert piece, said
                said += piece
            os.write(master, typed + b"\n")
            out, err = p.communicate(timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 0, said + err
    assert out.splitlines()[-1] == b"0 snapshots"


def test_a_stop_as_the_prompt_is_written_gives_the_terminal_its_echo_back():
    """The echo was turned off before the prompt was written, and put back only for a stop (Ctrl-C) that came
    after it: one that came as it was written (a Ctrl-C pressed at once) left the terminal without echo."""
    import pty
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # on a terminal of its own, the controlling one: a stop lands as the prompt is written
        code = 3
        try:
            written = os.write

            def stopped_at_the_prompt(out: int, data: bytes) -> int:
                if data == b"password: ":
                    written(out, data)
                    raise KeyboardInterrupt
                return written(out, data)

            os.write = stopped_at_the_prompt
            try:
                passwords.prompt("password: ", False)
            except KeyboardInterrupt:
                pass
            os.write = written
            code = 0 if termios.tcgetattr(0)[3] & termios.ECHO else 1
        finally:
            os._exit(code)
    try:
        while True:  # drained, that the child never waits for room to write
            try:
                if not os.read(fd, 4096):
                    break
            except OSError:  # the other end closed
                break
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0  # 1: the echo stayed off
