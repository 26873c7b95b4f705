"""Local-disk remote: write to a temp file, fsync, rename, fsync the directory.

Objects of 1 MiB or more (packs) are written past the page cache (``O_DIRECT``)
when the caller's buffer is page-aligned, as the backup's pack buffers are:
the kernel then copies nothing into cache pages it must first allocate and
clear (the largest part of an initial backup's system time), and a backup
does not evict what the machine keeps cached (a database's pages) to hold
packs nobody reads soon.  A file system or buffer that refuses it gets the
ordinary write.
"""
from __future__ import annotations

import errno
import os
import pwd
import stat
import sys
import time
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

from chunkvault.errors import (
    ObjectExists,
    ObjectNotFound,
    ObjectTooLarge,
    PermissionDenied,
    RemoteError,
    StorageFull,
    UsageError,
)
from chunkvault.localfiles import absolute_path, make_private_dirs

from .base import ObjectInfo, Remote, is_key, spelled, validate_key, validate_prefix, yes_no_option

TEMP_PREFIX = ".tmp-"
# Space kept back so that a lock can still be written on a full disk: forget and prune, the commands that
# free space, take one before they delete anything.  Not an object: never listed.
RESERVE_NAME = ".reserve"
RESERVE_SIZE = 1 << 20
LOCK_PREFIX = "locks/"
# The one kind of key a full disk must still take: an exclusive lock (store/locks.py names them so).  A
# backup's shared lock took the reserve too, and the backup then filled it with data: forget and prune
# found none left.
EXCLUSIVE_LOCK_PREFIX = "locks/x-"
_O_DIRECT = getattr(os, "O_DIRECT", 0) if sys.platform.startswith("linux") else 0
DIRECT_IO_MIN = 1 << 20
STREAM_PIECE = 1 << 20  # put_stream asks its source for at most this much at a time
# O_DIRECT wants buffer address, length and file offset aligned to the device's logical block (512 or 4096).
_DIRECT_ALIGN = 4096


def os_error(exc: OSError, what: str, root: str = "") -> RemoteError:
    """One line for an OSError; a full disk names the repository (``root``): a copy between two local
    repositories writes the same names into both."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left on device while {what}" + (f" in {root}" if root else ""))
    if exc.errno == errno.EFBIG:
        return ObjectTooLarge(f"file too large for the file system or the file size limit while {what}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"permission denied while {what}: {exc.strerror}{_not_ours(exc.filename, root)}")
    if exc.errno == errno.EROFS:
        return PermissionDenied(f"permission denied while {what}: {exc.strerror}")
    if exc.errno == errno.ENOTDIR:  # say where: a file stands where the repository needs a directory
        return RemoteError(f"{what}: {exc.strerror} ({exc.filename} lies below a file)")
    where = f": {exc.filename}" if exc.filename else ""  # a directory that could not be made (init in /proc)
    return RemoteError(f"{what}: {exc.strerror or exc}{where}")


def _not_ours(path: str | None, root: str) -> str:
    """Whose the path refused is, where that is another user than this process's: the path itself, else the
    nearest directory above it, up to the repository ``root`` (past paths that do not exist or cannot be
    looked at: the first that exists above a repository not yet made), that belongs to another.  A command
    run as root in a service account's repository leaves files of root's, mode 0600, which that account's
    commands may then not read: "Permission denied" alone does not say so.  Empty where every such path is
    this user's, or none can be looked at."""
    me = os.geteuid()
    while path:
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is not None and st.st_uid != me:
            return f" ({path} belongs to {_user(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}; " \
                   f"this command runs as {_user(me)})"
        up = os.path.dirname(path)
        if up == path or (st is not None and not (root and path.startswith(root + os.sep))):
            return ""
        path = up
    return ""


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def read_range_reference(path: str, start: int, length: int) -> bytes:
    """``length`` bytes of the file at ``path`` from ``start`` (to the end when negative), fewer only at its
    end: ``read_range`` in Python."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _pread_all(fd, start, length if length >= 0 else None)
    finally:
        os.close(fd)


try:  # open, pread and close with the GIL released once
    from ._fileio import read_range
except ImportError:
    read_range = read_range_reference


def _pread_all(fd: int, start: int, length: int | None) -> bytes:
    """``length`` bytes from ``start`` (everything to the end when None), fewer only at the end of the file."""
    if length is None:
        length = max(0, os.fstat(fd).st_size - start)
    data = os.pread(fd, length, start)
    if len(data) == length or not data:
        return data
    parts = [data]  # a short read before the end: rare (signals, reads past 2 GiB)
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, start + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _set_direct(fd: int, on: bool) -> None:
    import fcntl  # Linux only, as O_DIRECT here

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)


def _write_direct(fd: int, view: memoryview) -> None:
    """Write the block-aligned head of ``view`` past the page cache, the rest (or all of it, when the buffer
    or the file system refuses: EINVAL) through it."""
    head = len(view) - len(view) % _DIRECT_ALIGN
    try:
        _set_direct(fd, True)
        while head:
            n = os.write(fd, view[:head])
            view, head = view[n:], head - n
            if n % _DIRECT_ALIGN:
                break
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    _set_direct(fd, False)
    _write_all(fd, view)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_version(st: os.stat_result) -> str:
    """An object's version: its file's modification time and inode, which every write changes (an object
    is written beside its name, then renamed over it)."""
    return f"{st.st_mtime_ns:x}.{st.st_ino:x}"


def _outdate(tmp: str, final: str) -> None:
    """Give ``tmp`` a later mtime, in whole seconds, than the ``final`` it replaces: a repository on a server's
    disk is also read over SFTP, whose listing's version is mtime in whole seconds and size, which a rewrite
    to one size in one second left as it was (another machine's cache then served the old object)."""
    try:
        old = int(os.stat(final).st_mtime)
    except FileNotFoundError:
        return
    if int(os.stat(tmp).st_mtime) <= old:
        os.utime(tmp, (time.time(), old + 1))


_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS)  # link() on FAT, exFAT, some FUSE file systems
_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


def _rename_noreplace(src: str, dst: str) -> bool:
    """renameat2(RENAME_NOREPLACE): FileExistsError when ``dst`` exists; False where the kernel, the C
    library or the file system (a FUSE one) has no such rename."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err), dst)


def _put_absent(tmp: str, final: str) -> bool:
    """Put the written ``tmp`` at ``final`` unless something is there (FileExistsError).  True when ``tmp``
    keeps its name (a hard link was made: the caller removes it).  A file system without hard links (FAT
    and exFAT, a repository on a USB disk, refuse link() with EPERM) takes a rename that does not replace,
    or, where it has none either (FUSE file systems), a rename after a look: two writers of one name at one
    moment may then both succeed, the last one's file staying, which for content-named objects is the
    same content."""
    try:
        os.link(tmp, final)
        return True
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS or isinstance(exc, FileExistsError):
            raise
    if not _rename_noreplace(tmp, final):
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), final)
        os.rename(tmp, final)
    return False


def ancestor_identities(root: str, parts: list[str]) -> set[tuple[int, int]]:
    """(device, inode) of ``root`` and of each directory below it on the way to ``root/parts`` (that one
    left out): what a listing of ``parts`` must not walk into again through a link (a loop)."""
    found = set()
    for depth in range(len(parts)):
        try:
            st = os.stat(os.path.join(root, *parts[:depth]))
        except OSError:
            break
        found.add((st.st_dev, st.st_ino))
    return found


def _first_visit(path: str, visited: set[tuple[int, int]]) -> bool:
    """Whether the directory at ``path`` (a link followed) was not walked before; it is noted."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if (st.st_dev, st.st_ino) in visited:
        return False
    visited.add((st.st_dev, st.st_ino))
    return True


def local_path(url: str) -> str:
    """The directory a local repository's URL names: a plain path as given, a ``file://`` URL's path
    percent-decoded (``file://localhost/srv/repo`` too)."""
    if url[:7].lower() != "file://":
        return url
    parsed = urlparse("file://" + url[7:])
    if parsed.netloc not in ("", "localhost"):
        raise UsageError(f"file URL must name a local path: {url!r}")
    if "?" in url or "#" in url:  # dropped by the parse: file:///srv/repo?x opened /srv/repo
        raise UsageError(f"file:// URL takes no query or fragment: {url!r} (a name holding '?' or '#': "
                         "%3F, %23, or give the plain path)")
    path = unquote(parsed.path)
    if not path:  # an unset variable after file://: the working directory was taken for it
        raise UsageError(f"file URL {url!r} names no path (file:///srv/repo, or a plain path)")
    return path


#: Room kept under a repository's path for the names of its objects and their temporary files.
_KEY_ROOM = 128


def _checked_root(root: str) -> str:
    """A repository's directory, absolute; UsageError where no file system holds it: a NUL in it was Python's
    ValueError at the first object read, and a name in it longer than the file system takes the storage's
    failure (exit 14, as a disk gone), for what is a mistyped path."""
    root = os.fspath(root)
    if "\0" in root:
        raise UsageError(f"a local repository's path holds no NUL character: {root!r}")
    path = absolute_path(root, "local repository path")
    limit = _name_max(path)
    long = next((name for name in path.split("/") if len(os.fsencode(name)) > limit), None)
    if long is not None:
        raise UsageError(f"local repository path {_cut(path, 80)}: the name {_cut(long, 24)} in it is longer "
                         f"than the file system takes ({limit} bytes)")
    path_max = os.pathconf("/", "PC_PATH_MAX")
    if 0 < path_max < len(os.fsencode(path)) + _KEY_ROOM:
        raise UsageError(f"local repository path {_cut(path, 80)} is too long: its objects' paths would pass the "
                         f"{path_max} bytes a path may have")
    return path


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _name_max(path: str) -> int:
    """The longest name the file system at ``path`` (or, while it does not exist, its nearest existing
    ancestor) takes."""
    while True:
        try:
            limit = os.pathconf(path, "PC_NAME_MAX")
            return limit if limit > 0 else 1 << 30  # none told: no limit to check
        except OSError:
            if path == os.path.dirname(path):
                return 255
            path = os.path.dirname(path)


class LocalRemote(Remote):
    fork_safe = True  # each read opens, preads and closes
    cheap_ranges = True

    def __init__(self, root: str, *, fsync: bool = True, direct_io: bool = True):
        self.root = _checked_root(root)
        self.display_url = self.root
        self.fsync = fsync
        self.direct_io = direct_io and bool(_O_DIRECT)
        self._known_dirs: set[str] = set()
        self._writing: set[str] = set()  # temp files being written now: never removed as abandoned
        self._reserve_kept = False  # this process saw the reserve in place, or made it
        # The exclusive locks stored through this remote and not yet deleted: while one is held (a forget,
        # prune or repair runs), what it writes on a full disk may take the reserve too.
        self._exclusive: set[str] = set()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "LocalRemote":
        path = local_path(url)
        flags = {"fsync": True, "direct_io": True}
        for name, value in options.items():
            if name not in flags:
                raise UsageError(f"unknown option {spelled(name)!r} for a local repository (known: fsync, direct-io)")
            flags[name] = yes_no_option("local repository", name, value)  # "no" from the API too, as -o gives
        return cls(path, **flags)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *validate_key(key).split("/"))

    def _ensure_dir(self, d: str) -> None:
        if d in self._known_dirs:
            return
        make_private_dirs(d)  # 0700 whatever the umask: under 000 another user could delete objects
        self._known_dirs.add(d)

    def put(self, key: str, data: bytes, *, if_absent: bool = False, reserve: bool = True) -> None:
        """``reserve``: whether a full disk may take the reserve for this write while an exclusive lock is held;
        a service sharing this remote among its clients says no for one whose token is not full, as the lock
        is not that client's (a killed prune's stale one held for good let every client's writes take it)."""
        exclusive = key.startswith(EXCLUSIVE_LOCK_PREFIX)
        try:
            self._put(key, data, if_absent)
        except StorageFull:
            if not reserve or not (exclusive or self._exclusive) or not self._release_reserve():
                raise
            self._put(key, data, if_absent)
        if exclusive:
            self._exclusive.add(key)

    def _release_reserve(self) -> bool:
        """Free the reserve for what a full disk refused under an exclusive lock (the lock itself, or the
        index a prune writes before it deletes anything); True when there was one."""
        self._reserve_kept = False
        try:
            os.unlink(os.path.join(self.root, RESERVE_NAME))
        except OSError:
            return False
        return True

    def keep_reserve(self) -> None:
        """Make the reserve where it is missing and the disk has room (after a deletion, once per process
        until it is used): best effort, a disk too full for it is no error.  Not while an exclusive lock
        stored here is held: its command (a prune on a full disk) may have freed that room to finish, and
        the lock's deletion makes the reserve again."""
        if self._reserve_kept or self._exclusive:
            return
        path = os.path.join(self.root, RESERVE_NAME)
        if os.path.exists(path):
            self._reserve_kept = True
            return
        tmp = os.path.join(self.root, TEMP_PREFIX + os.urandom(8).hex())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                # written, not fallocated: a copy-on-write or compressing file system would keep no room
                _write_all(fd, memoryview(os.urandom(RESERVE_SIZE)))
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._reserve_kept = True
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _put(self, key: str, data: bytes, if_absent: bool) -> None:
        view = memoryview(data).cast("B")

        def write(fd: int) -> bool:
            if self.direct_io and len(view) >= DIRECT_IO_MIN:
                _write_direct(fd, view)
            else:
                _write_all(fd, view)
            return True

        self._write_object(key, write, if_absent)

    def put_stream(self, key: str, read: Callable[[int], bytes], length: int, *, if_absent: bool = False,
                   reserve: bool = True) -> bool:
        """Store the ``length`` bytes ``read(n)`` hands over a piece at a time (an upload as it arrives), holding
        none of them: they go into the temp file as they come, which is renamed into place only once all are
        in.  False, with nothing stored, when ``read`` gives b"" before the end (the sender stopped short).
        ``reserve`` as for ``put``."""

        if reserve and self._exclusive and self._free_bytes() < length + RESERVE_SIZE:  # a stream cannot be sent again
            self._release_reserve()

        def write(fd: int) -> bool:
            left = length
            while left:
                piece = read(min(left, STREAM_PIECE))
                if not piece:
                    return False
                _write_all(fd, memoryview(piece))
                left -= len(piece)
            return True

        return self._write_object(key, write, if_absent)

    def _free_bytes(self) -> int:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def _write_object(self, key: str, write: Callable[[int], bool], if_absent: bool) -> bool:
        """Temp file, ``write`` into it, fsync, rename (or link, for ``if_absent``), directory fsync; False when
        ``write`` says the data was incomplete (the temp file is removed, nothing is stored)."""
        final = self._path(key)
        d = os.path.dirname(final)
        tmp: str | None = None
        try:
            tmp, fd = self._create_temp(d)
            try:
                complete = write(fd)
                if complete and self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if not complete:
                return False
            if if_absent:
                try:
                    if not _put_absent(tmp, final):
                        self._writing.discard(tmp)
                        tmp = None
                except FileExistsError:
                    raise ObjectExists(key) from None
            else:
                _outdate(tmp, final)
                os.replace(tmp, final)
                self._writing.discard(tmp)
                tmp = None
            if self.fsync:
                _fsync_dir(d)
            return True
        except OSError as exc:
            raise os_error(exc, f"writing {key}", self.root) from None
        finally:
            if tmp is not None:
                self._writing.discard(tmp)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def _create_temp(self, d: str) -> tuple[str, int]:
        """A new temp file in directory ``d`` (made when missing), open for writing.  A directory this process
        made before and that is gone (the tree emptied under a running service) is made again, once."""
        tmp = os.path.join(d, TEMP_PREFIX + os.urandom(8).hex())
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self._ensure_dir(d)
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            if d not in self._known_dirs:
                raise
            self._known_dirs.discard(d)
            self._ensure_dir(d)
            fd = os.open(tmp, flags, 0o600)
        self._writing.add(tmp)
        return tmp, fd

    def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        # One C call, not a file object: restores and differentials make tens of thousands of ranged reads;
        # the file object's setup was a sixth of a differential's reading threads, and each system call
        # made from Python a wait to get the GIL back.
        try:
            return read_range(self._path(key), start or 0, -1 if length is None else length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # a file where a directory was named
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise os_error(exc, f"reading {key}", self.root) from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        # Walk only the directory the prefix lies in, not the whole repository.
        head, _, _ = prefix.rpartition("/")
        base = os.path.join(self.root, *head.split("/")) if head else self.root
        if not os.path.isdir(base):
            return
        visited = ancestor_identities(self.root, head.split("/") if head else [])  # each walked once: no loop
        _first_visit(base, visited)
        for dirpath, dirnames, filenames in os.walk(base, onerror=self._unlisted,
                                                    followlinks=True):  # data/ab on another disk, linked
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            # a directory whose name is no key's (lost+found on data/'s own disk) holds no object: not walked,
            # and so never a listing that fails on it
            dirnames[:] = [d for d in dirnames
                           if ((rel + d + "/").startswith(prefix) or prefix.startswith(rel + d + "/"))
                           and is_key(rel + d) and _first_visit(os.path.join(dirpath, d), visited)]
            for name in filenames:
                if name.startswith(TEMP_PREFIX) or (not rel and name == RESERVE_NAME):
                    continue
                key = rel + name
                if key.startswith(prefix) and is_key(key):  # not a name of ours (a desktop's .DS_Store): left alone
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue
                    except OSError as exc:  # behind a link into a directory it may not pass: as _unlisted
                        raise os_error(exc, f"listing {key}", self.root) from None
                    yield ObjectInfo(key, st.st_size, file_version(st), st.st_mtime)

    def _unlisted(self, exc: OSError) -> None:
        """A directory the walk could not read: gone meanwhile (a prune's emptied ``data/ab``) it held
        nothing, but one that does not open (mode 000, another owner) must not list as empty: its packs
        were missing to `check`, and `repair index` wrote an index without them."""
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            return
        where = os.path.relpath(exc.filename, self.root) if exc.filename else self.root
        raise os_error(exc, f"listing {where}", self.root) from None

    def delete(self, key: str) -> None:
        self._exclusive.discard(key)
        try:
            os.unlink(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise os_error(exc, f"deleting {key}", self.root) from None
        if key.startswith(LOCK_PREFIX):  # a command ends: what it wrote is there, what it freed is free
            self.keep_reserve()

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise os_error(exc, f"stat {key}", self.root) from None
        if stat.S_ISDIR(st.st_mode):  # no object, as ``get`` and ``list`` take it: a directory in its place
            return None
        return ObjectInfo(key, st.st_size, file_version(st))

    def abandon_writes(self) -> None:
        """Remove the temp files of the writes still under way: at a service's exit whose wait for its uploads
        ran out, their threads end with the process and their temp files stayed until an hour-old cleanup
        (a write that ends meanwhile fails, or has its object already)."""
        for tmp in list(self._writing):
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def enclosing_repository(self) -> str | None:
        here = self.root
        while (above := os.path.dirname(here)) != here:
            if os.path.isfile(os.path.join(above, "config")) and os.path.isdir(os.path.join(above, "keys")):
                return above
            here = above
        return None

    def cleanup_temp(self, older_than: float = 3600.0) -> int:
        cutoff = time.time() - older_than
        removed = 0
        for path in list(self.temp_files()):
            if path in self._writing:
                continue
            try:
                if os.lstat(path).st_mtime < cutoff:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise os_error(exc, f"removing {path}", self.root) from None
        return removed

    def temp_files(self) -> Iterator[str]:
        """Leftover temp files of interrupted writes (for cleanup by check/prune), below linked directories
        too (``data/`` moved to a larger disk), as ``list`` walks them: each directory once."""
        visited: set[tuple[int, int]] = set()
        _first_visit(self.root, visited)
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = [d for d in dirnames if _first_visit(os.path.join(dirpath, d), visited)]
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    yield os.path.join(dirpath, name)
