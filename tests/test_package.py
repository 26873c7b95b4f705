"""The distribution installs one namespace with the three layers as subpackages."""
import importlib
import subprocess
import sys

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
