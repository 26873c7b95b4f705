"""Shell completion: the tables read from the parser, and the bash script completing real command lines."""
import argparse
import shlex
import shutil
import subprocess
import sys

import pytest

from chunkvault.completion import DIR, FILE, FLAG, VALUE, commands


def test_the_tables_follow_the_parser():
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--json", action="store_true")
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("restore")
    s.add_argument("snapshot")
    s.add_argument("--target")
    s.add_argument("--exclude-file", metavar="FILE")
    s.add_argument("-m", "--mode", choices=["a", "b"])
    s.add_argument("--tag")
    s.add_argument("--hidden", help=argparse.SUPPRESS)
    k = sub.add_parser("key").add_subparsers(dest="key_cmd").add_parser("add")
    k.add_argument("what", choices=["index", "packs"])
    root = commands(p)
    assert root.options == {"-h": FLAG, "--help": FLAG, "--json": FLAG}
    restore = root.subcommands["restore"]
    assert restore.options["--target"] == DIR and restore.options["--exclude-file"] == FILE
    assert restore.options["-m"] == restore.options["--mode"] == ("a", "b")
    assert restore.options["--tag"] == VALUE and "--hidden" not in restore.options
    assert root.subcommands["key"].subcommands["add"].positional == ("index", "packs")


def _complete(line: str, cwd: str) -> list[str]:
    """What the script offers for ``line`` (the cursor at its end), run by bash as it completes."""
    script = subprocess.run([sys.executable, "-m", "chunkvault.cli", "completion", "bash"], capture_output=True,
                            check=True).stdout.decode()
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    program = (script + "\nCOMP_WORDS=(" + " ".join(shlex.quote(w) for w in words) + ")\n"
               f"COMP_CWORD={len(words) - 1}\n_chunkvault\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    out = subprocess.run(["bash", "-c", program], capture_output=True, cwd=cwd, check=True)
    assert not out.stderr, out.stderr
    return sorted(out.stdout.decode().split("\n")[:-1])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("line, offered", [
    ("chunkvault re", ["repair", "restore", "rewrite"]),
    ("chunkvault backup --ty", ["--type"]),
    ("chunkvault backup --type ", ["auto", "diff", "full"]),
    ("chunkvault backup --progress=j", ["--progress=json"]),
    ("chunkvault backup --tag x --exclude-file ", ["a-dir", "a-file"]),  # the value skipped, files offered
    ("chunkvault key ", ["add", "export", "import", "list", "passwd", "remove"]),
    ("chunkvault key add --gen", ["--generate-secret"]),
    ("chunkvault repair ", ["index", "packs", "snapshots"]),
    ("chunkvault repair index ", ["a-dir", "a-file"]),
    ("chunkvault restore latest --target ", ["a-dir"]),
    ("chunkvault serve --li", ["--listen"]),
    ("chunkvault --ver", ["--version"]),
])
def test_bash_completes_commands_options_and_values(tmp_path, line, offered):
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("")
    assert _complete(line, str(tmp_path)) == offered


def test_every_command_takes_its_options_from_the_parser():
    from chunkvault import cli

    root = commands(cli.build_parser())
    assert set(root.subcommands) >= {"backup", "restore", "verify-restore", "key", "completion"}
    assert root.subcommands["backup"].options["--progress"] == ("auto", "json", "none")
    assert root.subcommands["backup"].options["--password-file"] == FILE
    assert root.subcommands["restore"].options["--target"] == DIR
    assert root.subcommands["key"].subcommands["passwd"].options["--kdf-time"] == VALUE
