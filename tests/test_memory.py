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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_heap_is_trimmed_where_glibc_has_malloc_trim():
    """A prune hands back what the threads reading the index and the manifests let go of."""
    code = ("import platform, sys\n"
            "from chunkvault.memory import trim_heap\n"
            "blocks = [bytearray(1000) for _ in range(100000)]\n"
            "del blocks\n"
            "sys.exit(0 if trim_heap() or platform.libc_ver()[0] != 'glibc' else 1)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("call, said", [
    ("derive_argon2id(b'password', bytes(16), 1, 64 << 10, 1)", "(Argon2id, 64 MiB)"),
    ("derive_kek(b'password', bytes(16), 16)", "(scrypt, 64 MiB)")])
def test_a_key_derivation_out_of_memory_names_the_limit(call, said):
    """Under ulimit -v opening a repository failed with "internal error: HashingError: Memory allocation
    error", and opening an export (and an older key file), whose scrypt memory OpenSSL allocates, with
    "internal error: ValueError: [digital envelope routines] malloc failure": neither the limit nor what
    needed the memory."""
    told = _under_an_address_space_limit(f"""
        from chunkvault.errors import ResourceExhausted
        from chunkvault.store.crypto import derive_argon2id, derive_kek
        try:
            {call}
        except ResourceExhausted as exc:
            print(exc)
    """, room=16 << 20)
    assert told.startswith(f"out of memory for the password's key derivation {said}") and "ulimit -v" in told


@pytest.mark.parametrize("exc, said", [(MemoryError(), "out of memory"), (OSError(errno.ENOMEM, "no"), "out of memory"),
                                       (RuntimeError("can't start new thread"), "cannot start a thread"),
                                       (Exception("cannot compress: Allocation error : not enough memory"),
                                        "out of memory"),
                                       (RuntimeError("a bug"), None), (OSError(errno.EIO, "io"), None)])
def test_the_limits_a_command_runs_into_are_told_apart_from_bugs(exc, said):
    from chunkvault.errors import resource_exhausted

    found = resource_exhausted(exc)
    assert (found is None) if said is None else str(found).startswith(said)


def _under_an_address_space_limit(code: str, room: int = 1 << 30) -> str:
    """What ``code`` prints, run in a process given an address-space limit (ulimit -v) ``room`` bytes past
    what it has mapped."""
    script = textwrap.dedent(f"""
        import resource
        size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) << 10
        resource.setrlimit(resource.RLIMIT_AS, (size + {room}, resource.getrlimit(resource.RLIMIT_AS)[1]))
    """) + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_thread_that_cannot_start_under_a_memory_limit_names_that_limit_too():
    """A thread's stack is taken from the address space: under ulimit -v a backup that could not start one
    was told to raise ulimit -u alone, a limit it was nowhere near."""
    said = _under_an_address_space_limit("""
        from chunkvault.errors import resource_exhausted
        print(resource_exhausted(RuntimeError("can't start new thread")))
    """)
    assert "ulimit -v" in said and "ulimit -u" in said


def test_under_an_address_space_limit_chunks_are_compressed_one_by_one():
    """python-zstandard's batch call mishandles a failed allocation with two threads at work: backups under a
    tight ulimit -v died of SIGSEGV or a heap-corruption abort in about one run in five.  Under such a limit
    it is not called, and the frames are the same."""
    said = _under_an_address_space_limit("""
        import os
        from chunkvault.store import blob

        class NoBatch:
            def __init__(self, inner):
                self.inner = inner

            def compress(self, data):
                return self.inner.compress(data)

            def multi_compress_to_buffer(self, datas):
                raise AssertionError("the batch call was made")

        real = blob._compressor
        blob._compressor = lambda level: NoBatch(real(level))
        datas = [os.urandom(100) * 50 for _ in range(4)]
        got = blob.compress_many(datas, 3)
        blob._compressor = real
        print(all(bytes(p) == bytes(blob.compress(d, 3)[1]) for (k, p), d in zip(got, datas)))
    """)
    assert said.strip() == "True"


def test_a_key_derivation_whose_threads_cannot_start_under_a_memory_limit_names_that_limit():
    """Under ulimit -v the key derivation's two threads are refused their stacks: opening a repository said
    to raise ulimit -u, a limit it was nowhere near."""
    said = _under_an_address_space_limit("""
        import argon2.low_level
        from argon2.exceptions import HashingError
        from chunkvault.errors import ResourceExhausted
        from chunkvault.store.crypto import derive_argon2id

        def refused(*args, **kwargs):
            raise HashingError("Threading failure")

        argon2.low_level.hash_secret_raw = refused
        try:
            derive_argon2id(b"password", bytes(16), 1, 64 << 10, 2)
        except ResourceExhausted as exc:
            print(exc)
    """)
    assert said.startswith("cannot start the password's key derivation's 2 threads")
    assert "ulimit -v" in said and "ulimit -u" in said


def test_a_native_library_the_memory_limit_keeps_from_loading_names_that_limit():
    """A native module is imported when first used (cryptography's when the first key file is opened): under
    ulimit -v the loader could not map it, and the command failed with "internal error: ImportError"."""
    code = """
        from chunkvault.errors import resource_exhausted
        print(resource_exhausted(ImportError("/x/_rust.abi3.so: failed to map segment from shared object")))
    """
    said = _under_an_address_space_limit(code)
    assert said.startswith("out of memory loading a native library") and "ulimit -v" in said
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "None"  # no limit set: a noexec mount, say, which is no memory limit


_WITH_THE_HEAP_FULL = """
    import resource
    from chunkvault.store import zstdbuf

    def heap_full(call):
        '''What ``call`` raised with the address space full to the byte, under a limit at its size.'''
        size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) << 10
        held, outcome = [], "returned"
        resource.setrlimit(resource.RLIMIT_AS, (size, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            for piece in (1 << 16, 1 << 12, 1 << 8):
                try:
                    while True:
                        held.append(bytearray(piece))
                except MemoryError:
                    pass
            call()
        except MemoryError:
            outcome = "MemoryError"
        finally:
            held.clear()
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        return outcome
"""


@pytest.mark.parametrize("call", ["zstdbuf.decompress_into(frame, out, len(data))",
                                  "zstdbuf.compress_against(data, base, 3, 64, 4)"])
def test_a_zstd_context_refused_its_memory_is_a_memory_error_not_a_crash(call):
    """A thread's first frame creates its zstd context: under ulimit -v libzstd's create call returned NULL,
    which was used as a context, and an export died of SIGSEGV in the middle of reading its blobs."""
    said = subprocess.run([sys.executable, "-c", textwrap.dedent(_WITH_THE_HEAP_FULL) + textwrap.dedent(f"""
        import os
        if zstdbuf.lib is None:
            print("MemoryError")  # the object API, which checks its own allocations
            raise SystemExit
        data, base = os.urandom(1 << 16), os.urandom(1 << 16)
        frame = zstdbuf.compress_against(data, b"", 3, 64, 4)
        del zstdbuf._local.cctxs  # the next call creates its contexts afresh
        out = bytearray(len(data))
        print(heap_full(lambda: {call}))
    """)], capture_output=True, text=True, timeout=60)
    assert said.returncode == 0, said.stderr
    assert said.stdout.strip() == "MemoryError"
