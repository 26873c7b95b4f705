"""Process settings the CLI applies at start, and the memory and thread limits it runs into."""
import errno
import subprocess
import sys
import textwrap

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_settings_are_accepted_by_glibc():
    """mallopt answers 0 for an option it does not know: every setting must be taken."""
    code = ("import platform, sys\n"
            "from chunkvault.memory import tune_allocator\n"
            "ok = tune_allocator()\n"
            "sys.exit(0 if ok or platform.libc_ver()[0] != 'glibc' else 1)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_key_derivation_out_of_memory_names_the_limit():
    """Under a memory limit (ulimit -v, MemoryMax=) opening a repository failed with "internal error:
    HashingError: Memory allocation error": neither the limit nor what needed the memory."""
    script = textwrap.dedent("""
        import resource
        from chunkvault.errors import ResourceExhausted
        from chunkvault.store.crypto import derive_argon2id

        size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) << 10
        resource.setrlimit(resource.RLIMIT_AS, (size + (16 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            derive_argon2id(b"password", bytes(16), 1, 64 << 10, 1)
        except ResourceExhausted as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("out of memory for the password's key derivation (Argon2id, 64 MiB)")
    assert "ulimit -v" in proc.stdout


@pytest.mark.parametrize("exc, said", [(MemoryError(), "out of memory"), (OSError(errno.ENOMEM, "no"), "out of memory"),
                                       (RuntimeError("can't start new thread"), "cannot start a thread"),
                                       (RuntimeError("a bug"), None), (OSError(errno.EIO, "io"), None)])
def test_the_limits_a_command_runs_into_are_told_apart_from_bugs(exc, said):
    from chunkvault.errors import resource_exhausted

    found = resource_exhausted(exc)
    assert (found is None) if said is None else str(found).startswith(said)
