"""The directories of a restore target, reached without leaving it.

A restore names what it writes by (directory descriptor, name): each
directory below the target is opened from its parent's descriptor, and a
symbolic link met on the way is followed only when what it leads to lies
inside the target.  A path walked by the kernel at every call would follow
a directory that someone who can write the target swapped for a link out of
it while the restore ran (to /etc, for a restore run as root), and write
there.  Descriptors are kept for the directories the restore is in, and
closed once it has moved on and nothing waits to be written through them.
"""
from __future__ import annotations

import errno
import os
import stat

from chunkvault.errors import TargetUnwritable

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
KEPT_DIRS = 64  # descriptors held before those off the current path are let go


def proc_path(fd: int, name: bytes | None = None) -> bytes:
    """A path that reaches the object open at ``fd`` (or ``name`` in the directory open there) through
    the descriptor, for calls that take no descriptor (a mode through an O_PATH descriptor, attributes
    of a special file): it walks no directory by name."""
    base = b"/proc/self/fd/%d" % fd
    return base if name is None else base + b"/" + name


class TargetDirs:
    """Descriptors of ``root`` (a directory the user named, followed if a link) and the directories below."""

    def __init__(self, root: bytes):
        self.root = root
        self._real = os.path.realpath(root)
        self._fds: dict[bytes, int] = {b"": os.open(root, _DIR_FLAGS)}
        self._retired: list[int] = []

    def at(self, rel: bytes, make: bool = False) -> tuple[int, bytes]:
        """The descriptor of the directory holding ``rel`` (relative to the root, checked safe), and
        ``rel``'s own name; the root itself is (its descriptor, "."). ``make``: missing directories on
        the way are made (mode 0700: their own metadata comes with their entries)."""
        if not rel:
            return self._fds[b""], b"."
        parent, _, name = rel.rpartition(b"/")
        return self.dir(parent, make), name

    def dir(self, rel: bytes, make: bool = False) -> int:
        """The descriptor of directory ``rel``: FileNotFoundError when it is missing (and not ``make``),
        NotADirectoryError when something else is in its place, TargetUnwritable for a link out of the
        target."""
        fd = self._fds.get(rel)
        if fd is not None:
            return fd
        parent, _, name = rel.rpartition(b"/")
        pfd = self.dir(parent, make)
        fd = self._open(pfd, name, rel, make)
        if len(self._fds) >= KEPT_DIRS:
            self._retire_off(rel)
        self._fds[rel] = fd
        return fd

    def _open(self, pfd: int, name: bytes, rel: bytes, make: bool) -> int:
        try:
            return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=pfd)
        except FileNotFoundError:
            if not make:
                raise
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:  # another process of the restore made it meanwhile
                pass
            return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=pfd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fsdecode(rel))
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)  # the link followed, then where it led is judged
        real = os.readlink(proc_path(fd))
        if real != self._real and not real.startswith(self._real.rstrip(b"/") + b"/"):
            os.close(fd)
            raise TargetUnwritable(f"a symbolic link in the target leads {os.fsdecode(rel)} out of the target "
                                   f"(to {os.fsdecode(real)}); not written through")
        return fd

    def forget(self, rel: bytes) -> None:
        """``rel`` was removed or replaced: its descriptor and those below it are let go."""
        below = rel + b"/"
        for key in [k for k in self._fds if k == rel or k.startswith(below)]:
            if key:
                self._retired.append(self._fds.pop(key))

    def _retire_off(self, rel: bytes) -> None:
        """Let go of the descriptors of directories that do not lie above ``rel``."""
        for key in [k for k in self._fds if k and not (rel == k or rel.startswith(k + b"/"))]:
            self._retired.append(self._fds.pop(key))

    def release(self) -> None:
        """Close the descriptors let go of: call when nothing queued to be written uses them."""
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def close(self) -> None:
        self._retired.extend(self._fds.values())
        self._fds.clear()
        self.release()
