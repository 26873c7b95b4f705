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


def _words(line: str, split_at_equals: bool) -> list[str]:
    """The words bash gives a completion function for ``line``: with "=" in COMP_WORDBREAKS (the default),
    ``--opt=value`` comes as ``--opt``, ``=``, ``value``."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    if not split_at_equals:
        return words
    out = []
    for w in words:
        if w.startswith("--") and "=" in w:
            opt, value = w.split("=", 1)
            out += [opt, "="] + ([value] if value else [])
        else:
            out.append(w)
    return out


def _complete(line: str, cwd: str, split_at_equals: bool = True) -> list[str]:
    """What the script offers for ``line`` (the cursor at its end), run by bash as it completes."""
    script = subprocess.run([sys.executable, "-m", "chunkvault.cli", "completion", "bash"], capture_output=True,
                            check=True).stdout.decode()
    words = _words(line, split_at_equals)
    program = (script + "\nCOMP_WORDS=(" + " ".join(shlex.quote(w) for w in words) + ")\n"
               f"COMP_CWORD={len(words) - 1}\n_chunkvault\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    out = subprocess.run(["bash", "-c", program], capture_output=True, cwd=cwd, check=True)
    assert not out.stderr, out.stderr
    return sorted(filter(None, out.stdout.decode().split("\n")))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("line, offered", [
    ("chunkvault re", ["repair", "restore", "rewrite"]),
    ("chunkvault backup --ty", ["--type"]),
    ("chunkvault backup --type ", ["auto", "diff", "full"]),
    ("chunkvault backup --progress=j", ["json"]),
    ("chunkvault backup --type=", ["auto", "diff", "full"]),
    ("chunkvault backup --type=full --tag ", []),
    ("chunkvault backup --type=full --exclude-file=a-f", ["a-file"]),
    ("chunkvault restore latest --target=a", ["a-dir"]),
    ("chunkvault restore latest --s3-endpoint ", []),
    ("chunkvault backup --tag x --exclude-file ", ["a-dir", "a-file"]),  # the value skipped, files offered
    ("chunkvault key ", ["add", "export", "import", "list", "passwd", "remove"]),
    ("chunkvault key add --gen", ["--generate-secret"]),
    ("chunkvault repair ", ["index", "packs", "snapshots", "wal"]),
    ("chunkvault repair index ", ["a-dir", "a-file"]),
    ("chunkvault restore latest --target ", ["a-dir"]),
    ("chunkvault serve --li", ["--listen"]),
    ("chunkvault --ver", ["--version"]),
])
def test_bash_completes_commands_options_and_values(tmp_path, line, offered):
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("")
    assert _complete(line, str(tmp_path)) == offered


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_where_equals_breaks_no_words_the_option_and_value_come_as_one(tmp_path):
    (tmp_path / "a-file").write_text("")
    assert _complete("chunkvault backup --progress=j", str(tmp_path), split_at_equals=False) == ["--progress=json"]
    assert _complete("chunkvault backup --exclude-file=a", str(tmp_path), split_at_equals=False) == [
        "--exclude-file=a-file"]


def test_every_command_takes_its_options_from_the_parser():
    from chunkvault import cli

    root = commands(cli.build_parser())
    assert set(root.subcommands) >= {"backup", "restore", "verify-restore", "key", "completion"}
    assert root.subcommands["backup"].options["--progress"] == ("auto", "json", "none")
    assert root.subcommands["backup"].options["--password-file"] == FILE
    assert root.subcommands["restore"].options["--target"] == DIR
    assert root.subcommands["key"].subcommands["passwd"].options["--kdf-time"] == VALUE
