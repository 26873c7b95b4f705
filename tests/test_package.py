"""The distribution installs one namespace with the three layers as subpackages."""
import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("name", ["chunkvault.store", "chunkvault.chunker", "chunkvault.remotes"])
def test_layers_are_subpackages(name):
    module = importlib.import_module(name)
    assert module.__name__ == name


def test_no_generic_top_level_names(tmp_path):
    # Run outside the source tree, where only what is installed is importable.
    code = (
        "import importlib.util, sys\n"
        "found = [n for n in ('store', 'chunker', 'remotes') if importlib.util.find_spec(n)]\n"
        "sys.exit(1 if found else 0)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0


def test_errors_have_distinct_exit_codes():
    from chunkvault import errors

    codes = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ChunkvaultError)
    }
    assert {2, 3, 10, 11, 12, 13, 14, 15, 16, 17} <= codes


def _run(argv, tmp_path):
    return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")})


def _entry_points():
    """Every way the command is started: ``python -m chunkvault`` was refused (no ``__main__``)."""
    ways = [[sys.executable, "-m", "chunkvault"], [sys.executable, "-m", "chunkvault.cli"]]
    script = Path(sys.executable).parent / "chunkvault"
    if script.exists():  # the installed console script, beside the interpreter of its environment
        ways.append([str(script)])
    return ways


@pytest.mark.parametrize("argv", _entry_points(), ids=lambda a: " ".join(Path(p).name for p in a))
def test_every_entry_point_runs_the_same_command(argv, tmp_path):
    import chunkvault

    version = _run([*argv, "--version"], tmp_path)
    assert (version.returncode, version.stdout) == (0, f"chunkvault {chunkvault.__version__}\n")
    no_repo = _run([*argv, "snapshots"], tmp_path)
    assert no_repo.returncode == 2 and no_repo.stderr.startswith("chunkvault: "), no_repo.stderr


def test_version_is_the_distributions():
    import chunkvault

    assert chunkvault.__version__ == importlib.metadata.version("chunkvault")
