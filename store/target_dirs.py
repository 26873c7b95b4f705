"""The directories of a restore target, reached without leaving it.

A restore names what it writes by (directory descriptor, name): each
directory below the target is opened from its parent's descriptor, and a
symbolic link met on the way is followed only when what it leads to lies
inside the target.  A path walked by the kernel at every call would follow
a directory that someone who can write the target swapped for a link out of
it while the restore ran (to /etc, for a restore run as root), and write
there.  Descriptors are kept for the directories the restore is in (at most
KEPT_DIRS, fewer under a low open files limit), and closed once it has moved
on (``release``, between entries) and nothing queued to be written names
them (``pin``).
"""
from __future__ import annotations

import errno
import os
import re
import stat

from chunkvault.errors import TargetUnwritable

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
KEPT_DIRS = 64  # descriptors held at most: those off the current path go first, then the shallowest on it
FILES_LIMIT_SHARE = 4  # under a low open files limit, at most this share of it is held: 1/4


def kept_dirs() -> int:
    """How many directory descriptors a restore holds: KEPT_DIRS, or a quarter of the open files limit where
    that is lower (at least 2).  Held at 64 under a limit of 32 (a container's, a unit's ``LimitNOFILE=``),
    they left none for the repository's packs and the files written: every file of the tree past the 20th
    directory or so failed with "Too many open files"."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return KEPT_DIRS
    if soft == resource.RLIM_INFINITY:
        return KEPT_DIRS
    return max(2, min(KEPT_DIRS, soft // FILES_LIMIT_SHARE))


def closed_to_owner(st: os.stat_result, need: int = 0o700) -> bool:
    """This user's own entry whose mode denies its owner ``need``: by default a directory it may not write in
    or search (0555, 000), which a restore opens up while it works in it, as its owner may."""
    return st.st_uid == os.geteuid() and st.st_mode & need != need


def proc_path(fd: int, name: bytes | None = None) -> bytes:
    """A path that reaches the object open at ``fd`` (or ``name`` in the directory open there) through
    the descriptor, for calls that take no descriptor (a mode through an O_PATH descriptor, attributes
    of a special file): it walks no directory by name."""
    base = b"/proc/self/fd/%d" % fd
    return base if name is None else base + b"/" + name


class TargetDirs:
    """Descriptors of ``root`` (a directory the user named, followed if a link) and the directories below."""

    def __init__(self, root: bytes, *, follow: bool = True):
        """``follow``: a link in ``root``'s place is followed (not where the caller has followed the one the
        user named already, and a link there now is another's)."""
        self.root = root
        self._real = os.path.realpath(root)
        self._fds: dict[bytes, int] = {b"": os.open(root, _DIR_FLAGS | (0 if follow else os.O_NOFOLLOW))}
        self._retired: list[int] = []
        self._pinned: dict[int, int] = {}  # descriptor -> how many queued writes name it
        self.kept = kept_dirs()

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
        below: list[bytes] = []  # the names from the nearest directory held open down to ``rel``
        held = rel
        while held not in self._fds:
            held, _, name = held.rpartition(b"/")
            below.append(name)
        fd = self._fds[held]
        opened: set[int] = set()  # by this call: no caller holds them, so they close at once when let go of
        for name in reversed(below):
            held = held + b"/" + name if held else name
            fd = self._open(fd, name, held, make)
            opened.add(fd)
            self._fds[held] = fd
            if len(self._fds) > self.kept:
                self._let_go(held, opened)
        return fd

    def _let_go(self, rel: bytes, opened: set[int]) -> None:
        """Bring the descriptors held below ``kept``: those off ``rel``'s path first, then the shallowest
        on it (a deep walk keeps the directories nearest to where it is)."""
        keys = [k for k in self._fds if k and k != rel]
        off = [k for k in keys if not rel.startswith(k + b"/")]
        on = sorted((k for k in keys if rel.startswith(k + b"/")), key=len)
        for key in (off + on)[: len(self._fds) - self.kept // 2]:
            fd = self._fds.pop(key)
            if fd in opened:
                os.close(fd)
            else:
                self._retired.append(fd)

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

    def pin(self, fd: int) -> None:
        """A write queued for later names ``fd``: it stays open until ``unpin``."""
        self._pinned[fd] = self._pinned.get(fd, 0) + 1

    @property
    def pinned(self) -> int:
        """How many descriptors queued writes name."""
        return len(self._pinned)

    def unpin(self, fd: int) -> None:
        if self._pinned[fd] == 1:
            del self._pinned[fd]
        else:
            self._pinned[fd] -= 1

    def release(self) -> None:
        """Close the descriptors let go of that no queued write names: call between entries, when no
        caller holds one from ``at`` or ``dir``."""
        kept = []
        for fd in self._retired:
            if fd in self._pinned:
                kept.append(fd)
            else:
                os.close(fd)
        self._retired = kept

    def close(self) -> None:
        self._pinned.clear()
        self._retired.extend(self._fds.values())
        self._fds.clear()
        self.release()


def mount_points(root: bytes) -> set[bytes]:
    """The mount points strictly below the directory ``root``, relative to it, from this process's mount
    table (none where it cannot be read).  A bind mount of the same file system has the device of the
    directories around it: only the table tells it apart.  Nothing is looked up on them (a network file
    system gone away would hang the lookup)."""
    real = os.path.realpath(root)
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            table = f.read()
    except OSError:
        return set()
    below = real.rstrip(b"/") + b"/"
    found = set()
    for line in table.splitlines():
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8) & 0xFF]), fields[4])
        if point.startswith(below):
            found.add(point[len(below):])
    return found


def remove_tree(parent_fd: int, name: bytes | str, *, unlock: bool = False) -> None:
    """Remove directory ``name`` (in the directory open at ``parent_fd``) and all below it, never following
    a link, as ``shutil.rmtree`` does with descriptors, but with one descriptor open and no recursion: a
    tree deeper than Python's recursion limit (a thousand levels) raised RecursionError, and one deeper
    than the descriptors a process may hold failed too.  A directory emptied is left through its "..",
    which is never a link, but is the directory it came down from only while no one moved it: each ".."
    must be the directory recorded on the way down (device and inode), else OSError (ESTALE) and nothing
    more is removed.  Moved meanwhile (a rename by whoever owns a directory in the tree), a root process
    otherwise went on emptying the directory it was moved into, /tmp say, and each parent above that it
    could rmdir, up to /.  Nor is another file system entered (EXDEV): a restore's --delete emptied what
    was mounted in the target (a bind mount of the same file system is for the caller to find,
    ``mount_points``).  ``unlock``: each directory of this user's that denies its owner (``closed_to_owner``)
    is opened (mode 0700) to be listed and emptied, for a tree restored with the modes it had.  Nor is a
    directory another restore is writing into as its target emptied (OSError, EBUSY, naming it): each is
    locked as a restore locks its target (store/target_lock.py) while it is emptied, and again each time
    the walk comes back up to it (its lock ends with the descriptor closed on the way down), or left as it
    is; a restore --delete of the directory above it removed it under the other restore's writes."""
    names = [os.fsencode(name)]  # the path from ``name`` down to the directory open at ``fd``
    device = os.fstat(parent_fd).st_dev
    fd, first = _open_to_empty(names[0], parent_fd, unlock, device)
    seen = [first]  # (device, inode) of each directory in ``names``
    try:
        _not_a_target(fd, names)
        while True:
            deeper = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        deeper = os.fsencode(entry.name)
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if deeper is not None:
                child, identity = _open_to_empty(deeper, fd, unlock, device)
                os.close(fd)
                fd = child
                names.append(deeper)
                seen.append(identity)
                _not_a_target(fd, names)
                continue
            emptied = names.pop()
            seen.pop()
            if not names:
                os.close(fd)
                fd = -1
                os.rmdir(emptied, dir_fd=parent_fd)
                return
            try:
                up = os.open(b"..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except PermissionError:  # an empty directory we may read but not search (0400): down again
                up = _open_path(parent_fd, names)
            os.close(fd)
            fd = up
            if _identity(fd) != seen[-1]:
                raise OSError(errno.ESTALE, "a directory in it was moved while it was removed: left as it is",
                              os.fsdecode(b"/".join(names)))
            _not_a_target(fd, names)  # locked anew: its lock went with the descriptor closed on the way down
            os.rmdir(emptied, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def _not_a_target(fd: int, names: list[bytes]) -> None:
    """Lock the directory open at ``fd`` (``names`` below the tree removed) as a restore locks its target, held
    while it stays open; OSError (EBUSY) where another restore holds it.  One that takes no lock: as before."""
    from .target_lock import locked_or_holder

    holder = locked_or_holder(fd)
    if holder is not None:
        below = f"{os.fsdecode(b'/'.join(names[1:]))} in it" if len(names) > 1 else "it"
        raise OSError(errno.EBUSY, f"{holder} is writing into {below}", os.fsdecode(b"/".join(names)))


def _open_path(parent_fd: int, names: list[bytes]) -> int:
    """The directory at ``names`` below ``parent_fd``, opened a level at a time, never through a link."""
    fd = parent_fd
    try:
        for name in names:
            down = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            if fd != parent_fd:
                os.close(fd)
            fd = down
    except BaseException:
        if fd != parent_fd:
            os.close(fd)
        raise
    return fd


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _open_to_empty(name: bytes, dir_fd: int, unlock: bool, device: int) -> tuple[int, tuple[int, int]]:
    """The directory ``name`` opened to be emptied, and its (device, inode); OSError (EXDEV) for one on
    another file system (what is mounted there is not part of the tree), before it is changed; ESTALE where
    another directory took its name meanwhile."""
    reach = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:  # through a descriptor that reaches the directory without reading it, never a link
        st = os.fstat(reach)
        if st.st_dev != device:
            raise OSError(errno.EXDEV, "another file system is there", os.fsdecode(name))
        if unlock and closed_to_owner(st):
            os.chmod(proc_path(reach), 0o700)
    finally:
        os.close(reach)
    # opened by name, as reading it needs no search permission on it (an empty 0400 directory is removed)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    if _identity(fd) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise OSError(errno.ESTALE, "another directory took its name while it was removed", os.fsdecode(name))
    return fd, (st.st_dev, st.st_ino)


SHORT_PATH = 3072  # bytes: a longer path below a root is reached through its directory's descriptor


class LongPaths:
    """Paths below ``root`` for calls that take a path: as they are when short, through the descriptor of
    their directory (``proc_path``) when longer than the system takes (PATH_MAX): a tree a restore wrote
    can be read back whatever its depth.  ``release`` between entries, ``close`` at the end."""

    def __init__(self, root: bytes):
        self.root = root
        self._dirs: TargetDirs | None = None

    def __call__(self, rel: bytes) -> bytes:
        full = os.path.join(self.root, rel) if rel else self.root
        if len(full) < SHORT_PATH:
            return full
        if self._dirs is None:
            self._dirs = TargetDirs(self.root)
        return proc_path(*self._dirs.at(rel))

    def release(self) -> None:
        if self._dirs is not None:
            self._dirs.release()

    def close(self) -> None:
        if self._dirs is not None:
            self._dirs.close()
            self._dirs = None
