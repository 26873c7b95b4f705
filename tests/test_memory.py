"""Process settings the CLI applies at start."""
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_settings_are_accepted_by_glibc():
    """mallopt answers 0 for an option it does not know: every setting must be taken."""
    code = ("import platform, sys\n"
            "from chunkvault.memory import tune_allocator\n"
            "ok = tune_allocator()\n"
            "sys.exit(0 if ok or platform.libc_ver()[0] != 'glibc' else 1)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
