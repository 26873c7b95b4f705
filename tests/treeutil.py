"""Describe a directory tree completely, to compare a restore with its source."""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest


def on_terminal(args: list[str], env: dict[str, str], *, typed: bytes | None = None
                ) -> tuple[subprocess.CompletedProcess, bytes]:
    """Run the `chunkvault` command with stderr (and, when ``typed`` is given, stdin fed with it) on a
    pseudo-terminal: the finished process (stdout captured) and what it wrote to the terminal."""
    import pty
    import sys

    master, slave = pty.openpty()
    if typed is not None:
        os.write(master, typed)
    proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", *args], env=env, stdout=subprocess.PIPE,
                          stderr=slave, stdin=slave if typed is not None else None, timeout=120)
    os.close(slave)
    said = b""
    try:
        while chunk := os.read(master, 65536):
            said += chunk
    except OSError:  # the terminal's other end closed: all read
        pass
    os.close(master)
    return proc, said


def refusing_open(name: str):
    """``os.open`` refusing files named ``name`` with EACCES (tests run as root, who reads every file), for
    ``monkeypatch.setattr("chunkvault.store.backup.os.open", ...)`` with ``python_file_reads``."""
    real_open = os.open

    def refuse(path, flags, *args):
        if os.path.basename(os.fsdecode(path)) == name:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    return refuse


def settle() -> None:
    """Wait until the times of what was just written lie before a backup's racy margin: the next backup's
    walk then begins late enough for the one after it to take those entries unread."""
    from chunkvault.store.backup import RACY_FINE_NS

    time.sleep(RACY_FINE_NS / 1e9 + 0.02)


def describe(root: str | bytes, *, owners: bool = False, times: bool = True) -> dict[bytes, tuple]:
    """path -> (kind, mode, [mtime_ns], size, content digest / link target, hardlink group)."""
    root_b = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    inodes: dict[tuple[int, int], bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root_b)
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            link_group = b""
            if stat.S_ISDIR(st.st_mode):
                kind, size, what = "dir", 0, b""
            elif stat.S_ISLNK(st.st_mode):
                kind, size, what = "symlink", 0, os.readlink(full)
                mode = 0
            elif stat.S_ISREG(st.st_mode):
                kind, size = "file", st.st_size
                with open(full, "rb") as f:
                    what = hashlib.sha256(f.read()).digest()
                if st.st_nlink > 1:
                    link_group = inodes.setdefault((st.st_dev, st.st_ino), rel)
            elif stat.S_ISFIFO(st.st_mode):
                kind, size, what = "fifo", 0, b""
            else:
                kind, size, what = "other", 0, b""
            t = st.st_mtime_ns if times and kind != "symlink" else 0
            owner = (st.st_uid, st.st_gid) if owners else ()
            out[rel] = (kind, mode, t, size, what, link_group, owner)
    st = os.stat(root_b)
    out[b"."] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns if times else 0)
    return out


def backed_up(tmp_path: Path, new_repo, make) -> tuple[object, str, Path]:
    """(repository, its URL, the source): a tree ``make`` fills under tmp_path/src, backed up once into a
    new repository under tmp_path/repo."""
    src = tmp_path / "src"
    src.mkdir()
    make(src)
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    repo.backup([str(src)])
    return repo, url, src


def threads() -> frozenset[str]:
    """The process's threads by id, C walkers' own among them (Python knows only its own); none without
    /proc.  ``threads() <= before`` holds once every thread started since ``before`` has ended, whichever
    older ones (a walker another test stopped) end meanwhile."""
    return frozenset(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else frozenset()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def walked_ahead(walk, threads_before: frozenset[str]):
    """``walk`` once its walk ahead is over, a C walk's thread through the (small) tree included."""
    walk._thread.join()
    wait_for(lambda: threads() <= threads_before)
    return walk


@contextlib.contextmanager
def mounted_tmpfs(path: str, size: str = "8m") -> Iterator[str]:
    """A tmpfs mounted on the directory ``path`` (another file system, or a small disk); the test is
    skipped where mounting needs rights it lacks."""
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def _run_quietly(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(args), capture_output=True, timeout=60)
    except FileNotFoundError as exc:  # the tool is not installed
        return subprocess.CompletedProcess(list(args), 127, b"", str(exc).encode())


@contextlib.contextmanager
def mounted_fat(path: str, kind: str = "exfat", size_mib: int = 32) -> Iterator[str]:
    """A fresh FAT (``kind`` "vfat") or exFAT file system of ``size_mib`` MiB, in an image beside ``path``,
    mounted on the directory ``path``: no hard links, symbolic links, owners or set-id bits, names
    compared without case.  The kernel's driver where it has one, else a FUSE one (fusefat, exfat-fuse);
    the test is skipped, saying why, where none can be mounted (not root, no driver or tool).  Unmounted,
    and its loop device let go, afterwards."""
    if os.geteuid() != 0:
        pytest.skip(f"mounting a {kind} image needs root")
    image = f"{path}.img"
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    made = _run_quietly(f"mkfs.{kind}", image)
    if made.returncode != 0:
        pytest.skip(f"cannot make a {kind} file system (package dosfstools or exfatprogs): "
                    f"{made.stderr.decode().strip()}")
    loop = ""
    if _run_quietly("mount", "-t", kind, "-o", "loop", image, path).returncode != 0:
        if kind == "vfat":
            tried = _run_quietly("fusefat", "-o", "rw+", image, path)
        else:
            attached = _run_quietly("losetup", "-f", "--show", image)
            loop = attached.stdout.decode().strip()
            tried = _run_quietly("mount.exfat-fuse", loop, path) if loop else attached
        if tried.returncode != 0:
            if loop:
                _run_quietly("losetup", "-d", loop)
            pytest.skip(f"cannot mount a {kind} file system here (no kernel driver, no FUSE driver: package "
                        f"{'fusefat' if kind == 'vfat' else 'exfat-fuse'}): {tried.stderr.decode().strip()}")
    try:
        yield path
    finally:
        if _run_quietly("umount", path).returncode != 0:
            _run_quietly("umount", "-l", path)
        if loop:
            _run_quietly("losetup", "-d", loop)


@contextlib.contextmanager
def mounted_ext4_whole_seconds(path: str, size_mib: int = 16) -> Iterator[str]:
    """An ext4 file system with 128-byte inodes (no room for sub-second times: it keeps whole seconds, from
    1901 to 2038), in an image beside ``path``, mounted on the directory ``path``; skipped where it cannot
    be made or mounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting an ext4 image needs root")
    image = f"{path}.img"
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    made = _run_quietly("mkfs.ext4", "-q", "-F", "-I", "128", image)
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 file system: {made.stderr.decode().strip()}")
    mounted = _run_quietly("mount", "-o", "loop", image, path)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount an ext4 image here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        if _run_quietly("umount", path).returncode != 0:
            _run_quietly("umount", "-l", path)


SMALL_TREE_NAMES = ("f1.a", "f2.b", "d0/f1.a", "d0/x.b", "d1/d0/f3.a", "d1/y")


def change_small_tree(src: Path, rng: random.Random, step: int) -> None:
    """One to three random changes among ``SMALL_TREE_NAMES`` under ``src``: a file removed, its
    directory removed, or the file written with a few bytes and an mtime drawn from two (so equal
    sizes and times come back)."""
    for name in rng.sample(SMALL_TREE_NAMES, rng.randint(1, 3)):
        path = src / name
        if path.exists() and rng.random() < 0.3:
            path.unlink()
            continue
        if rng.random() < 0.15 and path.parent != src and path.parent.exists():
            for p in sorted(path.parent.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            path.parent.rmdir()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.choice([b"", b"1", b"22", rng.randbytes(40), rng.randbytes(3000)]))
        os.utime(path, ns=(step * 10**9, rng.choice([1, 2]) * 10**9))


BLOCK = 4096  # the granularity of a restore's holes

#: Files whose zeros share chunks (64 KiB-2 MiB) with data, made by ``make_holes_inside_chunks``.
HOLE_FILES = ("middle", "head", "tail", "unaligned")


def make_holes_inside_chunks(root: Path) -> None:
    """Data, a 64 MiB hole, data; a hole at the start; one at the end; a long zero run that is not aligned on
    blocks, and one shorter than a block (which stays data).  In each the chunk where data and zeros meet is
    mostly zeros: restored a whole chunk of zeros at a time, each took megabytes it should not."""
    rnd = random.Random(7)

    def sparse(name: str, size: int, pieces: list[tuple[int, bytes]]) -> None:
        with open(root / name, "wb") as f:
            f.truncate(size)
            for at, data in pieces:
                f.seek(at)
                f.write(data)

    hole = 64 << 20
    sparse("middle", 100_000 + hole + 100_000, [(0, rnd.randbytes(100_000)), (100_000 + hole, rnd.randbytes(100_000))])
    head = (5 << 20) + 12345
    sparse("head", head + 50_000, [(head, rnd.randbytes(50_000))])
    sparse("tail", 50_000 + (5 << 20) + 777, [(0, rnd.randbytes(50_000))])
    data = bytearray(rnd.randbytes(3 << 20))
    data[1_001_234:2_101_234] = bytes(1_100_000)  # starts and ends inside a block
    data[611 * BLOCK:611 * BLOCK + 3000] = bytes(3000)  # aligned, shorter than a block
    (root / "unaligned").write_bytes(data)


def makes_holes(directory: Path) -> bool:
    """Whether the file system of ``directory`` leaves a hole where a file was never written."""
    probe = directory / ".hole-probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 20)
        f.seek((1 << 20) - 1)
        f.write(b"x")
    try:
        return os.stat(probe).st_blocks * 512 < 1 << 20
    finally:
        os.remove(probe)


def data_blocks(data: bytes) -> int:
    """Bytes of the ``BLOCK``-byte blocks of ``data`` (aligned on its start) that hold a byte other than zero."""
    zero, view = bytes(BLOCK), memoryview(data)
    return sum(BLOCK for i in range(0, len(view), BLOCK) if not zero.startswith(view[i:i + BLOCK]))


def assert_holes_kept(restored: Path, src: Path, slack: int) -> None:
    """Each of ``HOLE_FILES`` restored byte for byte, taking no more than its blocks of data and ``slack``."""
    for name in HOLE_FILES:
        data = (src / name).read_bytes()
        assert (restored / name).read_bytes() == data, name
        allocated = os.stat(restored / name).st_blocks * 512
        assert allocated <= data_blocks(data) + slack, (name, allocated, data_blocks(data))


def counting_reads(monkeypatch, path: str | None = None) -> list[int]:
    """The bytes each read of a file takes from here on (``os.read``, ``pread``, ``preadv``, ``readv``); of the
    file at ``path`` only, if given (other threads of the process read files too)."""
    read: list[int] = []
    for name in ("read", "pread", "preadv", "readv"):
        def counted(fd, *args, _real=getattr(os, name)):
            got = _real(fd, *args)
            if path is None or os.readlink(f"/proc/self/fd/{fd}") == path:
                read.append(got if isinstance(got, int) else len(got))
            return got
        monkeypatch.setattr(os, name, counted)
    return read
