"""The source tree of a backup: its roots, and its entries in manifest order.

A walk of tens of thousands of entries is mostly lstat calls, made in C with
the GIL released: a whole subtree by one walker (``_scandir.Walker``), or a
directory per call where an exclude glob needs Python to judge each entry (one
with "?" or "[...]", one re-including with "!", or one ignoring case).  A
backup cannot walk before it has started up: imports, the key (Argon2id, about
a quarter of a second, with the GIL released), the index and the parent's
manifest.
``SourceWalk.start`` walks ahead on a thread meanwhile.  Once the backup
consumes, the C walk goes on in its own thread a few thousand entries ahead
of it (the comparison with the parent's entries and the lstat calls overlap),
and an entry the backup reaches long after its lstat is stat'ed again.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import sys
import threading
import time
from typing import Any, Callable, Collection, Iterator, Mapping

from chunkvault.errors import UsageError
from chunkvault.localfiles import CACHEDIR_TAG, absolute_path, read_capped
from .excludes import ExcludeRules
from .manifest import held_ns, sort_key
from .xattrs import UNSUPPORTED_ERRNOS

#: One source entry: manifest path, path on disk, its lstat (a ``StatFailed`` when that failed), and whether it
#: could be read (a directory listed).
SourceItem = tuple[bytes, bytes, "os.stat_result | FileStat", bool]
#: A directory entry as a scan returns it: name, the errno of its lstat (0: none), and the lstat's fields
#: (mode, ino, dev, nlink, uid, gid, size, mtime_ns, ctime_ns, rdev, blocks) or None.
ScanItem = tuple[bytes, int, "tuple[int, ...] | None"]
#: O_NOATIME where the system has it: reading a file for a backup should not change its atime.
O_NOATIME = getattr(os, "O_NOATIME", 0)
#: A directory marker: a file name, and the bytes the file must start with (b"": any file of that name).
Marker = tuple[bytes, bytes]
#: A source's own rule for what to leave out of each directory, judged on the directory's whole listing (a file
#: left out because of another one beside it): given the directory's path below its source (b"" for the source)
#: and its entries' names, the names to leave out, with their subtrees.
LeaveOut = Callable[[bytes, list[bytes]], Collection[bytes]]
#: A source's own rule for directories that lie elsewhere but belong in its tree (a database's tablespaces): given
#: a directory's path below its source, the entries to add to it, each name with the directory on disk walked and
#: recorded under it (in place of an entry of that name the directory has).
Graft = Callable[[bytes], Mapping[bytes, bytes]]


def markers_of(exclude_if_present: list[str] | None = None, exclude_caches: bool = False) -> list[Marker]:
    """The markers of ``--exclude-if-present NAME[:HEADER]`` and ``--exclude-caches``: a directory holding a
    regular file of a marker's name that starts with its header keeps only its marker files."""
    out = [CACHEDIR_TAG] if exclude_caches else []
    for spec in exclude_if_present or []:
        name, _, header = spec.partition(":")
        if not name or "/" in name or name in (".", ".."):
            raise UsageError(f"not a file name to exclude directories by: {spec!r} (NAME or NAME:HEADER)")
        marker = (os.fsencode(name), os.fsencode(header))
        if marker not in out:
            out.append(marker)
    return out


def read_list_file(path: str, what: str, *, raw: bool = False) -> list[str]:
    """The items of a list file: one per line, surrounding blanks stripped, empty lines and lines starting
    with ``#`` left out; with ``raw``, separated by NUL bytes and taken as they are (``find -print0``).
    ``-`` is standard input.  UsageError naming ``what`` when it cannot be read.

    A line ends at a line feed alone (a CRLF file's carriage return goes with the blanks): ``splitlines``
    also ends one at a carriage return, a form feed, NEL, a line separator..., which a file name may hold,
    and so split such a name into two paths that were not the one listed.  The blanks are ASCII's alone:
    ``str.strip`` also took a no-break space, NEL or a unit separator off a name's end."""
    try:
        if path == "-":
            if sys.stdin is None:  # started with it closed (<&-): Python then has no sys.stdin
                raise UsageError(f"cannot read {what} - (standard input): it is closed")
            data = _read_list(sys.stdin.buffer, "- (standard input)", what)
        else:
            with open(path, "rb") as f:
                data = _read_list(f, path, what)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    text = data.decode("utf-8", errors="surrogateescape")
    if raw:
        return [item for item in text.split("\0") if item]
    return [item for item in (line.strip(LIST_BLANKS) for line in text.split("\n"))
            if item and not item.startswith("#")]


LIST_BLANKS = " \t\r\v\f"  # what bytes.strip takes: ASCII's blanks, and a CRLF file's carriage return


DEVICE_LIST_LIMIT = 1 << 20


def _read_list(f: Any, path: str, what: str) -> bytes:
    """All of ``f``, but at most ``DEVICE_LIST_LIMIT`` bytes of a device other than a terminal: /dev/null is
    an empty list, while /dev/zero or /dev/urandom never end and were read until memory ran out."""
    mode = os.fstat(f.fileno()).st_mode
    if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) or os.isatty(f.fileno()):
        return f.read()
    return read_capped(f, DEVICE_LIST_LIMIT, f"{what} {path} is a device that gave", "give a file or a pipe")


def read_exclude_file(path: str) -> list[str]:
    """The globs of an exclude file (``read_list_file``)."""
    return read_list_file(path, "exclude file")


def excludes_of(globs: list[str], files: list[str]) -> list[str]:
    """``--exclude`` globs, then the globs of each ``--exclude-file``."""
    return list(globs) + [g for path in files for g in read_exclude_file(path)]


def ordered_excludes(given: list[tuple[str, str]]) -> list[str]:
    """The globs of ``("glob", GLOB)`` and ``("file", PATH)`` items in their order: an exclude file's
    lines stand where the file was named (a later ``!`` pattern takes back what the file left out)."""
    return [g for kind, value in given for g in ([value] if kind == "glob" else read_exclude_file(value))]


def keep_marked(path: bytes, listing: list[ScanItem], markers: list[Marker]) -> list[ScanItem]:
    """``listing`` of the directory at ``path``, or only its marker files when it holds one (see
    ``markers_of``): what the C walk does to every directory it lists."""
    names = {name: fields for name, err, fields in listing if not err}
    kept = set()
    for name, header in markers:
        fields = names.get(name)
        if fields is None or not stat.S_ISREG(fields[0]):
            continue
        if not header or _starts_with(os.path.join(path, name), header):
            kept.add(name)
    return [item for item in listing if item[0] in kept] if kept else listing


def _starts_with(path: bytes, header: bytes) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        data = b""
        while len(data) < len(header):
            part = os.read(fd, len(header) - len(data))
            if not part:
                break
            data += part
    except OSError:
        return False
    finally:
        os.close(fd)
    return data == header


#: What opening a file the walk saw as regular gives when something else took its place since (a FIFO, whose
#: open would wait for a writer for ever without O_NONBLOCK; a device; a directory): never a regular file's.
NOT_REGULAR_ERRNOS = (errno.ENXIO, errno.EISDIR)


class Replaced(OSError):
    """The file at a path is not the one the walk saw there (``open_source_file``)."""


def open_source_file(path: bytes, seen: tuple[int, int] | None = None, *, dir_fd: int | None = None) -> int:
    """A file of the source, opened to be read: not following a symlink put in its place, not waiting on a
    FIFO, and refused (``NOT_REGULAR_ERRNOS``) when no longer a regular file.  ``seen``: the (device, inode)
    the walk saw at ``path``; another file there raises ``Replaced``.  It may have been saved by a rename
    since, or reached through a directory above it swapped for a symbolic link: that would have the backup
    read what lies outside the tree."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    at = {} if dir_fd is None else {"dir_fd": dir_fd}
    try:
        fd = os.open(path, flags | O_NOATIME, **at)
    except PermissionError:  # O_NOATIME only for files we own (or as root)
        fd = os.open(path, flags, **at)
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.ENXIO
        raise OSError(code, "no longer a regular file", path)
    if seen is not None and (st.st_dev, st.st_ino) != seen:
        os.close(fd)
        raise Replaced(errno.ESTALE, "not the file the walk saw", path)
    return fd


def open_beneath(root: bytes, path: bytes) -> int:
    """``path``, a file below the directory ``root``, opened as ``open_source_file`` opens it, each directory
    between opened from the one above it without following a symbolic link (OSError, ELOOP or ENOTDIR, where
    one is one now): what lies there now, never outside the tree."""
    parts = path[len(root.rstrip(b"/")) + 1:].split(b"/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = below
        return open_source_file(parts[-1], dir_fd=fd)
    finally:
        os.close(fd)


#: A small file as ``read_small_files`` gives it: (data, size, mtime_ns, ctime_ns after reading, xattrs: 1 it has
#: extended attributes, 0 none, -1 unknown, device, inode), or the OSError opening or reading it raised.
SmallRead = tuple[bytes, int, int, int, int, int, int] | OSError


def _xattr_state(fd: int) -> int:
    try:
        return 1 if os.listxattr(fd) else 0
    except OSError as exc:
        return 0 if exc.errno in UNSUPPORTED_ERRNOS else -1


def read_small_files_reference(paths: list[bytes], limits: list[int], probe_xattrs: bool) -> list[SmallRead]:
    """Each file's first ``limit`` bytes, fstat fields after reading and whether it has extended attributes
    (``read_small_files``, which does all of it with the GIL released once, in Python)."""
    if len(paths) != len(limits):
        raise ValueError("paths and limits differ in length")
    out: list[SmallRead] = []
    for path, limit in zip(paths, limits):
        try:
            fd = open_source_file(path)
            try:
                data = os.read(fd, limit)
                while 0 < len(data) < limit:
                    part = os.read(fd, limit - len(data))
                    if not part:
                        break
                    data += part
                st = os.fstat(fd)
                xattrs = _xattr_state(fd) if probe_xattrs else -1
            finally:
                os.close(fd)
        except OSError as exc:  # naming the path whichever call failed (os.read names none)
            out.append(OSError(exc.errno, exc.strerror, path))
            continue
        out.append((data, st.st_size, held_ns(st.st_mtime_ns), held_ns(st.st_ctime_ns), xattrs, st.st_dev,
                    st.st_ino))
    return out


def scan_dir_reference(path: bytes, dev_ino: tuple[int, int] | None = None) -> list[ScanItem]:
    """A directory's entries, sorted, with their lstat fields: what the C scanner returns, in Python.

    ``dev_ino``: what the walk saw of the directory.  Opened by its path, it must be that one: swapped for
    a symbolic link since, or reached through a directory above swapped so, the walk would list what lies
    outside the tree (ENOTDIR for a link in its place, ESTALE for another directory there)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | (os.O_NOFOLLOW if dev_ino is not None else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if dev_ino is not None and exc.errno == errno.ELOOP:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path) from None
        raise
    try:
        now = os.fstat(fd)
        if dev_ino is not None and (now.st_dev, now.st_ino) != dev_ino:
            raise OSError(errno.ESTALE, "not the directory the walk saw", path)
        out: list[ScanItem] = []
        for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
            try:
                st = os.lstat(name, dir_fd=fd)
            except OSError as exc:
                out.append((name, exc.errno or errno.EIO, None))
                continue
            out.append((name, 0, (st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                                  st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_rdev, st.st_blocks)))
        return out
    finally:
        os.close(fd)


try:  # one call per directory, the GIL released for its listing and every lstat
    from ._scandir import scan as scan_dir
except ImportError:
    scan_dir = scan_dir_reference
try:  # whole subtrees, thousands of entries per call (see _tree)
    from ._scandir import Walker
except ImportError:
    Walker = None
try:  # open, read, fstat, a probe of the extended attributes and close of a run of files, the GIL released once
    from chunkvault.remotes._fileio import read_small_files
except ImportError:
    read_small_files = read_small_files_reference


def root_specs(paths: list[str]) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    """(manifest prefix, absolute path) per source, in manifest order, and the absolute paths.

    One directory backs up as the root itself (a restore into T makes T's
    contents the directory's).  Several sources each keep their absolute path
    without the leading "/", as restic and borg keep them, so any list fits
    (a ``find`` of files that share names too); a path given twice counts
    once, and a source inside another is left to it.  A source that does not
    exist keeps its place in the layout (the walk skips it with a warning), so
    the next backup, when it is back, lays the others out the same way.
    """
    if not paths:
        raise UsageError("nothing to back up: give at least one path")
    absolute = sorted({absolute_path(p, "source path") for p in paths})
    if not any(os.path.lexists(p) for p in absolute):
        raise UsageError(_none_there(absolute))
    for p in absolute:  # a source "inside" another through a symbolic link would be backed up by neither
        link = next((link for q in absolute if q != p and _inside(p, q) and (link := _link_between(q, p))), None)
        if link is not None:
            raise UsageError(f"{p} lies below {link}, a symbolic link, which is backed up as the link: name "
                             "the directory it leads to instead, or leave one of the two out")
    outer = [p for p in absolute if not any(q != p and _inside(p, q) for q in absolute)]
    if len(outer) == 1 and os.path.isdir(outer[0]) and not os.path.islink(outer[0]):
        return [(b"", os.fsencode(outer[0]))], absolute
    if len(outer) == 1:  # one file (or symbolic link): under its name
        return [(os.fsencode(os.path.basename(outer[0])), os.fsencode(outer[0]))], absolute
    roots = sorted(((os.fsencode(p.lstrip("/")), os.fsencode(p)) for p in outer), key=lambda r: sort_key(r[0]))
    return roots, absolute


def _none_there(absolute: list[str]) -> str:
    """Why no source can be backed up: one that is there but cannot be looked at (a directory above it this
    user may not search: EACCES) says so, where "does not exist" sent its user looking for a typo."""
    for p in absolute:
        try:
            os.lstat(p)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            return f"cannot read source path {p}: {exc.strerror or exc}"
    return (f"source path does not exist: {absolute[0]}" if len(absolute) == 1
            else f"none of the {len(absolute)} source paths exists")


def _walked_paths(directories: Collection[str], roots: list[tuple[bytes, bytes]]) -> dict[bytes, tuple[int, int]]:
    """Of each directory that lies in a root's tree, the path the walk reaches it by (the root's path and
    what lies below it: the walk follows no link, but the root's own path may pass through one), with its
    device and inode: the walk leaves out that directory, and only it."""
    out: dict[bytes, tuple[int, int]] = {}
    for directory in [*directories, *(a for d in directories for a in _mount_aliases(d))]:
        try:
            st = os.stat(directory)
            real = os.path.realpath(directory)
        except OSError:  # not there (yet): nothing of it to leave out
            continue
        for _, path in roots:
            top = os.path.realpath(os.fsdecode(path))
            if real.startswith(top.rstrip("/") + "/"):
                out[path.rstrip(b"/") + b"/" + os.fsencode(real[len(top.rstrip("/")) + 1:])] = (st.st_dev, st.st_ino)
    return out


def _mount_aliases(directory: str) -> list[str]:
    """The other paths a bind mount of its file system (or of a directory above it) reaches ``directory`` by,
    from this process's mount table (none where it cannot be read): the path alone does not tell them, and a
    tree holding one held the repository, backed up into itself at every run."""
    try:
        real = os.path.realpath(directory)
        with open("/proc/self/mountinfo", "rb") as f:
            table = f.read()
    except OSError:
        return []

    def unescape(field: bytes) -> str:  # a space, tab, newline or backslash in a path is written as \\ooo
        return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))

    mounts = [(fields[2], unescape(fields[3]), unescape(fields[4]))
              for fields in (line.split(b" ") for line in table.splitlines()) if len(fields) >= 5]

    def below(path: str, top: str) -> str | None:  # ``path`` below or at ``top``: the rest, "" or "/..."
        rest = path[len(top.rstrip("/")):]
        return rest if path.startswith(top.rstrip("/")) and rest[:1] in ("", "/") else None

    holding = [m for m in mounts if below(real, m[2]) is not None]
    if not holding:
        return []
    dev, root, point = max(reversed(holding), key=lambda m: len(m[2]))  # the last mounted of the deepest
    inside = root.rstrip("/") + below(real, point)  # its path in its file system
    out = []
    for d, r, p in mounts:
        rest = below(inside, r) if d == dev else None
        if rest is not None and (alias := p.rstrip("/") + rest or "/") != real:
            out.append(alias)
    return out


def _link_between(outer: str, inner: str) -> str | None:
    """The first symbolic link among ``outer`` and the directories between it and ``inner`` (below it)."""
    at = outer
    for part in inner[len(outer.rstrip("/")) + 1:].split("/")[:-1]:
        if os.path.islink(at):
            return at
        at = os.path.join(at, part)
    return at if os.path.islink(at) else None


def _inside(path: str, other: str) -> bool:
    """Whether ``path`` lies below the directory ``other`` (both absolute and normalized)."""
    return path.startswith(other.rstrip("/") + "/")


class FileStat:
    """The lstat fields a backup records, in a third of an ``os.stat_result``'s memory.

    Entries walked ahead wait in memory; full stat results made that buffer
    the largest part of an unchanged backup's peak memory.  ``st_blocks`` tells a sparse file, whose holes
    a backup does not read.
    """

    __slots__ = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
                 "st_mtime_ns", "st_ctime_ns", "st_rdev", "st_blocks")

    def __init__(self, st: os.stat_result):
        self.st_mode, self.st_ino, self.st_dev, self.st_nlink = st.st_mode, st.st_ino, st.st_dev, st.st_nlink
        self.st_uid, self.st_gid, self.st_size, self.st_rdev = st.st_uid, st.st_gid, st.st_size, st.st_rdev
        self.st_mtime_ns, self.st_ctime_ns, self.st_blocks = st.st_mtime_ns, st.st_ctime_ns, st.st_blocks

    @classmethod
    def of_fields(cls, f: tuple[int, ...]) -> "FileStat":
        self = cls.__new__(cls)
        (self.st_mode, self.st_ino, self.st_dev, self.st_nlink, self.st_uid, self.st_gid, self.st_size,
         self.st_mtime_ns, self.st_ctime_ns, self.st_rdev, self.st_blocks) = f
        return self


class StatFailed(FileStat):
    """What the walk yields for an entry whose lstat failed other than by its vanishing (``error``: the
    errno), instead of leaving it out: a backup lists it unreadable and keeps the parent's entry for it.
    Every field is 0, no file type, so it matches no recorded entry."""

    __slots__ = ("error",)

    def __init__(self, error: int):
        for name in FileStat.__slots__:
            setattr(self, name, 0)
        self.error = error


class Excluded:
    """What a walk told to report exclusions (``SourceWalk(report_excluded=True)``) yields in place of the
    stat of a path an exclusion rule left out (the top of the subtree left out): the ``rule``, one of
    ``EXCLUDE_RULES``."""

    __slots__ = ("rule",)

    def __init__(self, rule: str):
        self.rule = rule


#: The rules an ``Excluded`` names: ``--exclude`` (and ``--exclude-file``), ``--exclude-larger-than``,
#: ``--exclude-if-present`` (and ``--exclude-caches``), and ``--one-file-system`` (for a mount point, which is
#: kept, empty: its contents are what is left out), and "repository" (the local repository the backup writes to).
EXCLUDE_RULES = ("exclude", "exclude-larger-than", "exclude-if-present", "one-file-system", "repository")
_MARKED = -1  # the errno a listing gives a name that a directory's marker file leaves out (reporting walks)
_LEFT_OUT = -2  # likewise, a name the walk's ``leave_out`` leaves out


class TreeTotal:
    """The regular files a backup's ``walk`` will take, and their bytes, counted on a thread of its own by a
    second walk under the same rules (as restic's scanner): what a progress line's percentage and ETA need.
    ``done`` once that walk has ended; the counts grow until then.  Only for a backup that reports progress:
    it lists and stats the tree a second time."""

    def __init__(self, walk: "SourceWalk"):
        self.files = 0
        self.bytes = 0
        self.done = False
        self._stop = threading.Event()
        self._walk = SourceWalk(walk.roots, walk.excludes, iexcludes=walk.iexcludes, paths=walk.paths,
                                one_file_system=walk.one_file_system, markers=walk.markers,
                                max_file_size=walk.max_file_size, leave_out=walk.leave_out, graft=walk.graft,
                                repositories=walk.repositories)
        self._thread = threading.Thread(target=self._count, name="tree-total", daemon=True)
        self._thread.start()

    def _count(self) -> None:
        try:
            for _, _, st, _ in self._walk:
                if self._stop.is_set():
                    return
                if stat.S_ISREG(st.st_mode):
                    self.files += 1
                    self.bytes += st.st_size
            self.done = True
        except Exception:  # a count that cannot finish leaves the progress without a total, nothing more
            pass
        finally:
            self._walk.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class SourceWalk:
    """Entries in manifest order (depth first, names sorted); errors become warnings, never abort.  An
    entry whose lstat fails, other than by vanishing, comes with a ``StatFailed`` for its stat.

    Iterate it once.  ``start()`` first to walk ahead on a thread (at most
    ``ahead`` entries) until iteration begins.  A walk ahead older than
    ``STALE_AFTER`` seconds when iteration begins (the backup waited for a
    lock) is thrown away and the walk starts again, so that files changed
    meanwhile are not read against old metadata.  An entry reached more than
    ``RESTAT_AFTER`` seconds after it was stat'ed (its earlier siblings'
    subtrees took long) is stat'ed again.
    """

    STALE_AFTER = 30.0
    RESTAT_AFTER = 2.0
    #: Entries per call into the C walk as the backup takes them: few, since runs of unchanged entries
    #: are matched in C only between two batches (``skip_unchanged``).
    BATCH = 32
    #: Entries one ``skip_unchanged`` takes at most (the backup reports progress between calls).
    SKIP_LIMIT = 4096
    #: Entries the C walk's thread keeps queued once the backup takes them (about 210 bytes each).
    STEADY = 8192

    def __init__(self, roots: list[tuple[bytes, bytes]], excludes: list[str] | None = None, *,
                 iexcludes: list[str] | None = None, paths: list[str] | None = None, ahead: int = 1 << 16,
                 warnings: list[str] | None = None,
                 one_file_system: bool = False, markers: list[Marker] | None = None,
                 max_file_size: int | None = None, report_excluded: bool = False, leave_out: LeaveOut | None = None,
                 graft: Graft | None = None, repositories: Collection[str] = ()):
        self.roots = roots
        self.paths = paths if paths is not None else [os.fsdecode(p) for _, p in roots]
        self.excludes = list(excludes or [])
        self.iexcludes = list(iexcludes or [])
        self.rules = ExcludeRules(self.excludes, self.iexcludes)
        # A directory on another device than its root's is recorded, not listed (a mount point stays, empty).
        self.one_file_system = one_file_system
        self.markers = list(markers or [])
        self.max_file_size = max_file_size  # regular files larger than this are left out (the roots never)
        # Each path a rule leaves out is yielded, as an ``Excluded``: the walk then judges every entry in
        # Python, directory by directory (the C walk leaves them out unseen).
        self.report_excluded = report_excluded
        # A source's rule on each directory's listing (``LeaveOut``), such as PostgreSQL's for a database's
        # unlogged relations.  It needs Python at each directory, so the walk goes directory by directory,
        # the listing and its lstat calls still made in C: the C walk lists whole subtrees on a thread
        # without the GIL, which a call back into Python at every directory would take again and again.
        self.leave_out = leave_out
        # A source's rule for directories of its tree that lie elsewhere (``Graft``): asked at each directory,
        # so it walks in Python too.  A grafted directory is a device of its own for ``one_file_system`` (a
        # tablespace on its own disk is read, not recorded as a mount point).
        self.graft = graft
        self._grafted: set[bytes] = set()  # the disk paths of the directories grafted so far
        # The local repository the backup writes to, where it lies in the tree: left out, as borg leaves its
        # own out (each backup stored the packs the one before it wrote, growing without end).
        self.repositories = list(repositories)
        self._repositories = _walked_paths(self.repositories, roots)
        self._root_dev = -1
        # Globs of literals and "*" the C walk matches itself; "?" and "[...]" match characters, not
        # bytes, and "!" patterns and case-insensitive ones need the order or the case rules, so a walk
        # with those asks Python about each entry, directory by directory.
        plain = self.rules.plain_globs()
        self._c_excludes = [os.fsencode(g) for g in plain] if plain is not None else None
        self.warnings = warnings if warnings is not None else []
        # What a restic or gitignore habit writes, and never matches here: said, not silently backed up.
        self.warnings += [f"exclude pattern {p.text!r} matches nothing: patterns match a path below a source "
                          f"('sub/dir') or a name ('dir'), without a leading '/' or './' or a trailing '/'"
                          for lst in self.rules.lists for p in lst.patterns
                          if p.glob.startswith(("/", "./")) or p.glob.endswith("/")]
        self.warnings += self.rules.warnings()
        self.missing: list[bytes] = []  # the manifest paths of sources that did not exist
        self._ancestors: set[bytes] = set()  # the manifest paths of directories above several sources
        self._ahead = ahead
        self._walking_ahead = False
        self._between_batches: "Walker | None" = None
        self._walk = self._entries()
        self._buffered: list[SourceItem] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._iterated = False
        self._started = 0.0
        self._prefetch_warnings = 0
        # Before any entry is stat'ed or read: what this walk records was seen at this time or later.
        self.began_ns = time.time_ns()

    @classmethod
    def of_paths(cls, paths: list[str], excludes: list[str] | None = None, *, one_file_system: bool = False,
                 markers: list[Marker] | None = None, max_file_size: int | None = None,
                 iexcludes: list[str] | None = None, report_excluded: bool = False,
                 leave_out: LeaveOut | None = None, graft: Graft | None = None,
                 repositories: Collection[str] = ()) -> "SourceWalk":
        """The walk a backup of ``paths`` makes (see ``root_specs``); ``repositories``: the directory of the
        local repository it writes to, left out where it lies in the tree."""
        roots, absolute = root_specs(list(paths))
        return cls(roots, excludes, paths=absolute, one_file_system=one_file_system, markers=markers,
                   max_file_size=max_file_size, iexcludes=iexcludes, report_excluded=report_excluded,
                   leave_out=leave_out, graft=graft, repositories=repositories)

    def same_rules(self, paths: list[str], excludes: list[str] | None, one_file_system: bool,
                   markers: list[Marker], max_file_size: int | None = None,
                   iexcludes: list[str] | None = None, report_excluded: bool = False) -> bool:
        """Whether this is the walk ``of_paths`` would make of these arguments."""
        return (self.paths == root_specs(list(paths))[1] and self.excludes == list(excludes or [])
                and self.iexcludes == list(iexcludes or []) and self.one_file_system == one_file_system
                and self.markers == markers and self.max_file_size == max_file_size
                and self.report_excluded == report_excluded)

    def start(self) -> "SourceWalk":
        if self._thread is None and not self._iterated:
            self._started = time.monotonic()
            self._prefetch_warnings = len(self.warnings)
            self._thread = threading.Thread(target=self._prefetch, name="source-walk", daemon=True)
            self._thread.start()
        return self

    def _prefetch(self) -> None:
        buf, stop, limit = self._buffered, self._stop, self._ahead
        self._walking_ahead = True
        try:
            for item in self._walk:
                if item is None:  # the rest of the allowance waits in the C walk's queue
                    return
                buf.append(item)
                if len(buf) >= limit or stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer
            self._error = exc
        finally:
            self._walking_ahead = False

    def _end_walk_ahead(self) -> None:
        """Stop the thread walking ahead (at once where it walks in Python; a C walk has its own
        thread, which goes on)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __iter__(self) -> Iterator[SourceItem]:
        if self._iterated:
            raise RuntimeError("a SourceWalk is iterated once")
        self._iterated = True
        if self._thread is not None:
            self._end_walk_ahead()
            if time.monotonic() - self._started > self.STALE_AFTER:
                del self.warnings[self._prefetch_warnings:]
                self.missing.clear()
                self._buffered, self._error = [], None
                self._walk.close()
                self._walk = self._entries()
        if self._error is not None:
            raise self._error
        buffered, self._buffered = self._buffered, []
        yield from buffered
        yield from self._walk

    def close(self) -> None:
        """Stop a walk that will not be consumed (or not to its end)."""
        self._end_walk_ahead()
        self._walk.close()

    def excluded(self, rel: bytes, cut: int = 0) -> bool:
        """Whether a rule leaves out the entry at manifest path ``rel``, whose first ``cut`` bytes are its
        source's (``src/``, with several sources): patterns match the path below the source, as with one
        source, and the manifest path too."""
        if not cut:
            return self.rules.excluded(os.fsdecode(rel))
        return self.rules.excluded(os.fsdecode(rel[cut:]), os.fsdecode(rel))

    @staticmethod
    def _lstat(path: bytes) -> tuple[os.stat_result | None, int]:
        """The path's lstat, or None and the errno."""
        try:
            return os.lstat(path), 0
        except OSError as exc:
            return None, exc.errno or errno.EIO

    def _note_linked_directory(self, path: bytes) -> None:
        """Warn of a source that is a symbolic link to a directory: it is backed up as the link, as restic
        and borg keep one, so nothing of the tree it leads to is in the snapshot, which a trailing '/'
        (``/var/lib/db/``, where the shell and tar follow it) does not change.  Said rather than left to a
        restore to find out, since the backup otherwise reports success."""
        try:
            if not stat.S_ISDIR(os.stat(path).st_mode):
                return
            target = os.fsdecode(os.readlink(path))
        except OSError:  # dangling, a loop, or gone: there is no tree behind it to miss
            return
        self.warnings.append(f"source path {os.fsdecode(path)} is a symbolic link to a directory ({target}): "
                             f"backed up as the link, not what the directory holds; name "
                             f"{os.path.realpath(os.fsdecode(path))} to back that up")

    def _stat_failed(self, path: bytes, err: int) -> StatFailed | None:
        """The warning for a failed lstat, and what stands for the entry (None: it vanished, left out; so did
        a path whose directory became a file since it was listed)."""
        if err in (errno.ENOENT, errno.ENOTDIR):
            self.warnings.append(f"vanished during backup: {os.fsdecode(path)}")
            return None
        self.warnings.append(f"cannot stat {os.fsdecode(path)}: {os.strerror(err)}")
        return StatFailed(err)

    def _scan(self, path: bytes, st: os.stat_result | FileStat) -> tuple[list[ScanItem], bool | None]:
        """The directory's listing, and whether it could be listed: None when it is gone, or is not the
        directory ``st`` says the walk saw (``_unlisted``)."""
        try:
            listing = scan_dir(path, (st.st_dev, st.st_ino))
            if not self.markers:
                return listing, True
            kept = keep_marked(path, listing, self.markers)
            if self.report_excluded and len(kept) < len(listing):  # the others stay, to be reported
                names = {item[0] for item in kept}
                return [item if item[0] in names else (item[0], _MARKED, None) for item in listing], True
            return kept, True
        except OSError as exc:
            return [], self._unlisted(path, exc.errno or errno.EIO)

    def _unlisted(self, path: bytes, err: int) -> bool | None:
        """The warning for a directory that could not be listed; None when it vanished or is no longer a
        directory since its lstat (left out, as a vanished file is), else False (kept, unreadable)."""
        if err == errno.ENOENT:
            self.warnings.append(f"vanished during backup: {os.fsdecode(path)}")
            return None
        if err == errno.ENOTDIR:
            self.warnings.append(f"changed type during backup (left out until the next backup): {os.fsdecode(path)}")
            return None
        if err == errno.ESTALE:  # another directory there now, or one reached through a symbolic link
            self.warnings.append(f"replaced during backup (kept as the last backup found it, until the next "
                                 f"backup): {os.fsdecode(path)}")
            return False
        self.warnings.append(f"cannot read directory {os.fsdecode(path)}: {os.strerror(err)}")
        return False

    def _entries(self) -> Iterator[SourceItem | None]:
        """An explicit stack of iterators over (manifest path, disk path, lstat or None, errno), not
        recursion: each entry is yielded through one frame, not one per level.  The roots are the
        bottom iterator and are never excluded."""
        isdir, excludes = stat.S_ISDIR, bool(self.rules)
        cut = 0  # the length of the manifest path, with its "/", of the source whose subtree is walked
        stack: list[Iterator[tuple[bytes, bytes, os.stat_result | FileStat | None, int]]] = [
            ((rel, path, *self._lstat(path)) for rel, path in self._with_ancestors())]
        devs = [-1]  # beside each iterator of the stack, the device of the tree its entries lie in (one_file_system)
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                devs.pop()
                continue
            rel, path, st, err = item
            grafted = len(stack) > 1 and path in self._grafted
            if err == _MARKED:
                yield rel, path, Excluded("exclude-if-present"), False
                continue
            if err == _LEFT_OUT:
                yield rel, path, Excluded("exclude"), False
                continue
            if excludes and len(stack) > 1 and self.excluded(rel, cut):
                if self.report_excluded:
                    yield rel, path, Excluded("exclude"), False
                continue
            if len(stack) == 1 and rel in self._ancestors:
                if st is not None and not isdir(st.st_mode):
                    st, err = self._dir_stat(path)
                if st is not None:
                    yield rel, path, st, True
                continue
            if st is None and len(stack) == 1 and err == errno.ENOENT:
                self.warnings.append(f"source path does not exist, skipped: {os.fsdecode(path)}")
                self.missing.append(rel)
                continue
            if st is None:
                failed = self._stat_failed(path, err)
                if failed is not None:
                    yield rel, path, failed, False
                continue
            if len(stack) == 1:
                self._root_dev = devs[-1] = st.st_dev
                if stat.S_ISLNK(st.st_mode):
                    self._note_linked_directory(path)
            elif self.max_file_size is not None and stat.S_ISREG(st.st_mode) and st.st_size > self.max_file_size:
                if self.report_excluded:
                    yield rel, path, Excluded("exclude-larger-than"), False
                continue
            if not isdir(st.st_mode):
                yield rel, path, st, True
                continue
            if self._repositories and len(stack) > 1 and self._repositories.get(path) == (st.st_dev, st.st_ino):
                if self.report_excluded:  # a dry run's listing says what it leaves out, this too
                    yield rel, path, Excluded("repository"), False
                continue
            if self.one_file_system and not grafted and st.st_dev != devs[-1]:
                yield rel, path, st, True
                if self.report_excluded:  # its contents are left out
                    yield rel, path, Excluded("one-file-system"), False
                continue
            if (Walker is not None and self._c_excludes is not None and not self.report_excluded
                    and self.leave_out is None and self.graft is None and not self._holds_repository(path)):
                yield from self._tree(rel, path, st)
                continue
            listing, ok = self._scan(path, st)
            if ok is None:
                continue
            yield rel, path, st, ok
            if len(stack) == 1:
                cut = len(rel) + 1 if rel else 0
            if self.leave_out is not None:
                listing = self._left_out(rel[cut:], listing)
            elsewhere = self.graft(rel[cut:]) if self.graft is not None else None
            if elsewhere:
                listing = self._with_grafts(listing, elsewhere)
            stack.append(self._children(rel + b"/" if rel else b"", os.path.join(path, b""), listing, elsewhere))
            devs.append(st.st_dev if grafted or len(devs) == 1 else devs[-1])

    def leaves_out(self, repositories: Collection[str]) -> bool:
        """Whether this walk leaves out each of ``repositories`` that lies in its tree (a walk made by a caller
        without them would back the repository up into itself)."""
        return _walked_paths(repositories, self.roots).items() <= self._repositories.items()

    def _holds_repository(self, path: bytes) -> bool:
        """Whether the repository left out lies below the directory at ``path``: its subtree is then walked
        directory by directory down to it, not handed to the C walk, which would list it."""
        below = path.rstrip(b"/") + b"/"
        return any(p.startswith(below) for p in self._repositories)

    def _with_grafts(self, listing: list[ScanItem], elsewhere: Mapping[bytes, bytes]) -> list[ScanItem]:
        """``listing`` with the grafted directories in their places, each with its own lstat (one that is gone,
        or no longer a directory, is left out with a warning, as an entry vanished since its listing)."""
        out = {item[0]: item for item in listing}
        for name, path in elsewhere.items():
            st, err = self._lstat(path)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                st, err = None, errno.ENOTDIR
            out[name] = (name, err, st and (st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                                           st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_rdev,
                                           st.st_blocks))
            self._grafted.add(path)
        return [out[name] for name in sorted(out)]

    def _left_out(self, below: bytes, listing: list[ScanItem]) -> list[ScanItem]:
        """``listing`` less what ``leave_out`` leaves out of the directory at ``below`` (marked, not dropped,
        in a walk that reports exclusions)."""
        assert self.leave_out is not None
        gone = self.leave_out(below, [name for name, _, _ in listing])
        if not gone:
            return listing
        gone = set(gone)
        if self.report_excluded:
            return [(name, _LEFT_OUT, None) if name in gone else (name, err, f) for name, err, f in listing]
        return [item for item in listing if item[0] not in gone]

    def _with_ancestors(self) -> Iterator[tuple[bytes, bytes]]:
        """The roots, each after those of its ancestors not yet given: several sources lie under their
        absolute paths, and the directories above them are recorded too (not listed: only their own
        metadata), as restic records them, so a restore gives them their modes, owners and times."""
        self._ancestors.clear()  # a walk started again (see __iter__) gives them again
        for rel, path in self.roots:
            parts = rel.split(b"/") if path.endswith(b"/" + rel) else [rel]
            for i in range(1, len(parts)):
                ancestor = b"/".join(parts[:i])
                if ancestor not in self._ancestors:
                    self._ancestors.add(ancestor)
                    yield ancestor, b"/" + ancestor
            yield rel, path

    @staticmethod
    def _dir_stat(path: bytes) -> tuple[os.stat_result | None, int]:
        """An ancestor that is a symbolic link: the directory it leads to stands in for it (the tree has
        entries below it), or nothing when it leads to none."""
        try:
            st = os.stat(path)
        except OSError as exc:
            return None, exc.errno or errno.EIO
        return (st, 0) if stat.S_ISDIR(st.st_mode) else (None, errno.ENOTDIR)

    def _tree(self, rel: bytes, path: bytes, root_st: os.stat_result) -> Iterator[SourceItem | None]:
        """The directory at ``path`` and its subtree, walked in C: what the per-directory walk above
        yields for it.  The walker's own thread lists and stats with no GIL held while this one takes
        its batches; walking ahead, starting that thread is all there is to do (a None tells the walk
        ahead it is over).  A thread walking directory by directory waited for the GIL at each one
        while the backup's main thread was busy.  Excluding needs Python per entry where a glob
        matches characters, so that takes the per-directory walk."""
        walker = Walker(rel, path, self._c_excludes, self._root_dev if self.one_file_system else None,
                        self.markers or None, self.max_file_size)
        walker.start(max(1, self._ahead - len(self._buffered)) if self._walking_ahead else self.STEADY,
                     self.STEADY)
        try:
            if self._walking_ahead:
                yield None
            # Entries the walk stat'ed long before the backup reaches them are stat'ed again in the batch's
            # call, with no GIL held (one call here per entry cost the main thread a tenth of a first backup).
            while batch := walker.batch(self.BATCH, self.RESTAT_AFTER):
                last = batch[-1]
                for item in batch:
                    rel, path, st, err, list_err = item
                    ok = not list_err
                    if st is None and not err:
                        st = root_st
                    if st is None:
                        st, ok = self._stat_failed(path, err), False
                        if st is None:
                            continue
                    if list_err and self._unlisted(path, list_err) is None:
                        continue
                    if item is last:  # what comes next is still in the walker's queue
                        self._between_batches = walker
                    yield rel, path, st, ok
                    self._between_batches = None
        finally:
            self._between_batches = None
            walker.stop()  # a walk left unfinished ends its thread

    def skip_unchanged(self, record: Any, records: Iterator[Any], taken: list | None, op_entry: int,
                       t_file: int, t_dir: int, t_symlink: int, ignore: int = 0,
                       racy: tuple[int, int, int, int] = (1, 0, 1, 0)) -> tuple[int, int, int, int, Any]:
        """Take the next entries of the walk while they are what the parent's records say, unchanged
        (``record``, then those ``records`` yields, in step): (files, directories, symlinks, bytes of the
        files, the first record not taken).  Only files with one link, directories that could be listed
        and symlinks count, and only right after the last entry of a C walk's batch, before the next is
        asked for; elsewhere nothing is taken.  ``taken`` (a list or None) gets the records of the
        entries taken.  ``ignore``: fields not compared, 1 inode and device, 2 change time.  ``racy``: the
        times within which an entry is not taken (from, to: for times with sub-second digits, then for whole
        seconds; by default none)."""
        walker = self._between_batches
        if walker is None:
            return 0, 0, 0, 0, record
        return walker.skip_unchanged(record, records, self.RESTAT_AFTER, op_entry, t_file, t_dir, t_symlink,
                                     taken, self.SKIP_LIMIT, ignore, *racy)

    def _children(self, rel_prefix: bytes, path_prefix: bytes, listing: list[ScanItem],
                  elsewhere: Mapping[bytes, bytes] | None = None
                  ) -> Iterator[tuple[bytes, bytes, FileStat | os.stat_result | None, int]]:
        scanned = time.monotonic()
        of_fields = FileStat.of_fields
        for name, err, fields in listing:
            path = elsewhere.get(name, path_prefix + name) if elsewhere else path_prefix + name
            if err in (_MARKED, _LEFT_OUT):
                yield rel_prefix + name, path, None, err
                continue
            st: FileStat | os.stat_result | None = of_fields(fields) if fields is not None else None
            if time.monotonic() - scanned > self.RESTAT_AFTER:
                try:  # by path: another file's fields (see restat in _scandir.c) are not taken
                    now = os.lstat(path)
                    if st is None or (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                        st, err = now, 0
                except OSError as exc:
                    st, err = None, exc.errno or errno.EIO
            yield rel_prefix + name, path, st, err


class TargetWalk(SourceWalk):
    """A restore target's walk for ``restore --delete`` (what the target holds and the snapshot lacks): a
    path that vanishes or changes while it runs (another process at work in the target) is named relative
    to the target and worded as the restore's, where the backup's words ("vanished during backup", "left
    out until the next backup") told of a backup that never ran.  The target is walked through its
    descriptor (``Restorer.root``), whose path is no name to show.

    The warning that an entry could not be stat'ed or listed is given once the walk moves past it: its
    consumer may find it no failure first (``pass_over``), when the entry is removed whole, or lies in a
    directory of this user's that it opens up and walks again, where the warning, given and then taken
    back, told of a failure there was not."""

    STAT = "cannot stat"
    LIST = "cannot read directory"

    def __init__(self, target: bytes, path: bytes, warnings: list[str]):
        super().__init__([(b"", path)], warnings=warnings, one_file_system=True)
        self.target = target
        self._held: tuple[str, str] | None = None  # (STAT or LIST, the warning) of the entry yielded last

    def __iter__(self) -> Iterator[SourceItem]:
        for item in super().__iter__():
            yield item
            self._give_held()
        self._give_held()

    def pass_over(self, *failures: str) -> None:
        """The entry yielded last failed as one of ``failures`` (STAT, LIST) says, which is no failure of the
        target's where its consumer removes it whole or walks it opened up: its warning is not given."""
        if self._held is not None and self._held[0] in failures:
            self._held = None

    def _hold(self, failure: str, warning: str) -> None:
        self._give_held()
        self._held = (failure, warning)

    def _give_held(self) -> None:
        if self._held is not None:
            self.warnings.append(self._held[1])
            self._held = None

    def _named(self, path: bytes) -> str:
        return os.fsdecode(os.path.relpath(path, self.target))

    def _stat_failed(self, path: bytes, err: int) -> StatFailed | None:
        if err in (errno.ENOENT, errno.ENOTDIR):  # gone: nothing there for --delete to remove
            self.warnings.append(f"{self._named(path)}: vanished while --delete walked the target")
            return None
        self._hold(self.STAT, f"{self.STAT} {self._named(path)}: {os.strerror(err)}")
        return StatFailed(err)

    def _unlisted(self, path: bytes, err: int) -> bool | None:
        if err in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
            self.warnings.append(f"{self._named(path)}: replaced or removed while --delete walked the target; "
                                 "what it holds now was not searched for what the snapshot lacks")
            return False if err == errno.ESTALE else None
        self._hold(self.LIST, f"{self.LIST} {self._named(path)}: {os.strerror(err)}")
        return False
