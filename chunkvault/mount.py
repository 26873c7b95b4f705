"""``chunkvault mount``: the snapshots as a read-only file system (FUSE, through mfusepy).

Browse every snapshot, copy out a few files with the usual tools, diff two
versions of a configuration: without restoring a whole snapshot.  The layout
above the snapshots' files is ``mountview.Layout``.  A snapshot's tree is
resolved when first entered and kept (a few at a time); file data is read a
chunk at a time, each chunk checked against its id as a restore checks it,
and recently read chunks are kept in the repository's plaintext cache.  The
mount holds a shared lock while it is mounted, as a restore does, so no prune
deletes data under it; new snapshots show up when a listing is older than
REFRESH_SECONDS.
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import math
import os
import shutil
import signal
import stat
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, Callable, Iterator, NamedTuple, TypeVar

from .display import shown_name, warn
from .errors import ChunkvaultError, CorruptObject, MountFailed, RemoteError, RemoteUnavailable, UsageError
from .mountview import InSnapshot, Layout, Link, Node, SnapshotTree, VirtualDir, seek_data_or_hole
from .repository import Repository
from .store import locks
from .store.archive import SPARSE_LEAST
from .store.chain import meets
from .store.manifest import T_BLOCKDEV, T_CHARDEV, T_DIR, T_FIFO, T_FILE, T_HARDLINK, T_SYMLINK, Entry, unread
from .store.owners import OwnerMap
from .store.snapshot import Snapshot
from .store.xattrs import decode_xattrs

REFRESH_SECONDS = 30.0
LISTING_WAIT = 2.0  # how long the operation that starts a listing of the snapshots waits for it
# Resolved trees held at once, besides the one in use: at most this many, of at most this many bytes in all
# (``SnapshotTree.nbytes``: about 150 bytes and the path per entry, so some 200 MB for a million files).
TREES_KEPT = 8
TREE_BYTES_KEPT = 256 << 20
SENT_KEPT = 1 << 16  # directories whose listing with attributes is remembered (``readdir_plus``)
HOLES_KEPT = 4096  # files whose holes are kept found (``_holes_of``): getattr gives their allocated blocks

_T = TypeVar("_T")

_TYPE_BITS = {T_FILE: stat.S_IFREG, T_HARDLINK: stat.S_IFREG, T_DIR: stat.S_IFDIR, T_SYMLINK: stat.S_IFLNK,
              T_FIFO: stat.S_IFIFO, T_CHARDEV: stat.S_IFCHR, T_BLOCKDEV: stat.S_IFBLK}


def _inode(snapshot_id: str, path: str) -> int:
    """A node's inode number: stable, nonzero, the same for every name of a hard-linked file (its first
    path), and, at 63 bits of a hash, another for every other node."""
    digest = hashlib.blake2b(f"{snapshot_id}\0{path}".encode(errors="surrogateescape"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) or 1


def _file_inode(snapshot_id: str, tree: SnapshotTree, rel: bytes) -> tuple[int, int]:
    """The inode number of ``rel`` in a snapshot's tree (its file's, whichever of its names it is), and how
    many names the file has."""
    first, names = tree.linked(rel)
    return _inode(snapshot_id, os.fsdecode(first)), names


# What a read that finds data gone after a prune replaced the index says (``SnapshotFS._pruned_since``), once
# for each file or snapshot: one line for each chunk, each advising `repair index`, told of a snapshot forgotten.
PRUNED = ("its data is gone since the mount read the index: a prune ran meanwhile (its snapshot forgotten or "
          "rewritten since it was listed?); look again before repairing anything")

#: Said once another command removed the mount's lock: it reads on, as with ``--no-lock``.
LOCK_REMOVED = ("the mount's lock was found removed by another command ({gap:.0f} s after its last refresh: taken "
                "for stale while the repository was out of reach or this process stopped, or removed by `unlock "
                "--remove-all`); reading on without it: a prune may run meanwhile, and what it removes reads as an "
                "I/O error (mount again to hold a lock)")

SESSION_POLL_SECONDS = 0.2  # how often the mount looks whether libfuse was told to end
UNAVAILABLE_SECONDS = 60.0  # reads fail at once for this long after a read gave up on the remote


def _session_exited() -> Callable[[], bool] | None:
    """Whether libfuse's session, this thread's (an operation's), was told to end; None where that cannot be
    asked.  libfuse 2 and 3 both answer ``fuse_session_exited(fuse_get_session(fuse))``."""
    try:
        lib = _fuse()._libfuse
        fuse = lib.fuse_get_context().contents.fuse
        get_session, session_exited = lib["fuse_get_session"], lib["fuse_session_exited"]
    except (AttributeError, OSError, ValueError, MountFailed):
        return None
    get_session.argtypes, get_session.restype = [ctypes.c_void_p], ctypes.c_void_p
    session_exited.argtypes, session_exited.restype = [ctypes.c_void_p], ctypes.c_int
    session = get_session(fuse) if fuse else None
    if not session:
        return None
    return lambda: bool(session_exited(session))


# What libfuse 3's fuse_main returns when its loop ended with an error, which is how a stop signal ends it
# (libfuse 2 returned 0 then).
_LOOP_ENDED_BY_SIGNAL = 8


@functools.cache
def _fuse() -> Any:
    """mfusepy, on libfuse 3 where the machine has it and can mount with it: mfusepy takes libfuse 2 first,
    which many machines keep for other FUSE file systems (fusefat, exfat-fuse), and it has no lseek, so the
    kernel found no hole in a file of the mount.  FUSE_LIBRARY_NAME or FUSE_LIBRARY_PATH still choose.
    Found once: each error a mount answers makes its exception here, and looking for libfuse 3 again ran
    ``ldconfig -p`` each time (``ls -l`` of a directory of 2,000 entries ran it 2,000 times, one for each
    ACL it found none of), changing the environment from the mount's threads meanwhile."""
    chosen = "FUSE_LIBRARY_NAME" in os.environ or "FUSE_LIBRARY_PATH" in os.environ
    fuse3 = not chosen and ctypes.util.find_library("fuse3") is not None and (
        os.geteuid() == 0 or shutil.which("fusermount3") is not None)
    try:
        if fuse3:
            os.environ["FUSE_LIBRARY_NAME"] = "fuse3"  # read once, as mfusepy is first imported
        import mfusepy
    except (ImportError, OSError) as exc:  # mfusepy raises OSError when it finds no libfuse
        raise MountFailed(f"mount needs FUSE: {exc} (Debian: apt-get install fuse3)") from None
    finally:
        if fuse3:
            del os.environ["FUSE_LIBRARY_NAME"]
    return mfusepy


#: libfuse 3's readdir flag: the kernel asks for each entry's attributes with its name (readdirplus); the
#: filler's flag that an entry carries them; and the capability that leaves asking for them to the kernel.
_READDIR_PLUS = 1
_FILL_DIR_PLUS = 2
_CAP_READDIRPLUS_AUTO = 1 << 14  # the kernel decides per call whether to ask for attributes


def _fuse_class(mfusepy: Any) -> Any:
    """mfusepy's FUSE, with what it lacks for the mount passed on to the operations: libfuse 3's lseek where
    mfusepy has the callback's slot, not its wrapper (3.1), without which the kernel finds no hole in a file
    of the mount; and readdirplus, the attributes readdir gives sent with the names.  Without it, the kernel
    looked up each name of a listing on its own, a round trip to getattr apiece: ``find -ls`` of 100,000
    files took 21 s where getattr's own work was 6 s."""
    has_lseek = hasattr(mfusepy.FUSE, "lseek")

    class FUSE(mfusepy.FUSE):  # type: ignore[misc, valid-type]
        if not has_lseek:
            def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
                fh = fip.contents if self.raw_fi else fip.contents.fh
                name = None if path is None else path.decode(self.encoding, self.errors)
                return self.operations.lseek(name, offset, whence, fh)

        if getattr(mfusepy, "fuse_version_major", 2) >= 3:
            def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any,
                               flags: int) -> int:
                """Each entry sent with its attributes, where the kernel asks for them.  At offsets counted
                from 1: libfuse 3.14 sends no attributes with a listing given at offset 0 (fixed in 3.17)."""
                if not flags & _READDIR_PLUS:
                    return super().readdir_fuse_3(path, buf, filler, offset, fip, flags)
                name = None if path is None else path.decode(self.encoding, self.errors)
                st = mfusepy.c_stat()
                for n, (entry, attrs) in enumerate(self.operations.readdir_plus(name, fip.contents.fh, offset),
                                                   offset + 1):
                    ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
                    mfusepy.set_st_attrs(st, attrs, use_ns=self.use_ns)
                    plus = _FILL_DIR_PLUS if "st_mode" in attrs else 0  # else the kernel looks it up itself
                    if filler(buf, entry.encode(self.encoding, self.errors), st, n, plus) != 0:
                        break  # the kernel's buffer is full: it asks again from the offset it got last
                return 0

            def init_fuse_3(self, conn: Any, config: Any) -> None:
                """Every listing with attributes: by default the kernel asks for them in a listing's first
                call alone, until a name of it is looked up, and tools list a whole directory before they
                stat a name: the rest of the names were looked up one by one."""
                super().init_fuse_3(conn, config)
                conn.contents.want &= ~_CAP_READDIRPLUS_AUTO

    return FUSE


class _Listing(NamedTuple):
    """A directory's names, "." and ".." first, and the attributes of the ``i``-th as readdir gives them."""

    names: list[str]
    attrs: Callable[[int], dict[str, Any]]


class _Chunks:
    """Chunk plaintexts for the mount's reads: each checked against its id and kept in the repository's
    cache; the chunk after the one a read ends in is decoded ahead on a worker thread, so a file read
    from start to end (cp, tar, a checksum) finds each chunk ready (decoding releases the interpreter).
    Only while a worker is free: queued without bound, the reads ahead of random reads (several readers, a
    backup tool's) were decoded for nothing, and a read of a chunk queued there waited for all before it."""

    def __init__(self, repo: Repository, workers: int = 2):
        self.store = repo.store
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="mount-ahead")
        self.pending: dict[bytes, Future[Any]] = {}
        self.lock = threading.Lock()

    def _read(self, cid: bytes) -> Any:
        return self.store.read_blob(cid, verify=True, cache=True)

    def get(self, cid: bytes) -> Any:
        with self.lock:
            fut = self.pending.get(cid)
        if fut is not None:
            try:
                return fut.result()
            except CorruptObject:  # read again here: begun earlier, it may have followed an index dropped since
                pass
        return self._read(cid)

    def ahead(self, cid: bytes) -> None:
        with self.lock:
            if cid in self.pending or len(self.pending) >= self.workers:  # each read ahead at once has its worker
                return
            fut = self.pending[cid] = self.pool.submit(self._read, cid)
        fut.add_done_callback(lambda _f: self._forget(cid))

    def _forget(self, cid: bytes) -> None:
        with self.lock:
            self.pending.pop(cid, None)

    def close(self) -> None:
        """No more reads ahead; one under way ends on its own (its retries once the mount is ending)."""
        self.pool.shutdown(wait=False, cancel_futures=True)


class _File:
    """An open file of a snapshot: where each of its chunks starts, for reads at any offset."""

    def __init__(self, path: str, entry: Entry, chunks: _Chunks, node: InSnapshot):
        self.path = path  # as the file system shows it, for messages
        self.opened = time.monotonic()
        self.entry = entry
        self.node = node
        self.chunks = chunks
        self.ids = entry.chunk_ids()
        self.asked_ahead = -1
        self.starts = [0]
        for cid in self.ids:
            loc = chunks.store.locate(cid)
            if loc is None:
                raise ChunkvaultError(f"chunk {cid.hex()} of {os.fsdecode(entry.path)} is in no index")
            self.starts.append(self.starts[-1] + loc.raw_length)

    def read(self, size: int, offset: int) -> bytes:
        out = []
        i = bisect.bisect_right(self.starts, offset) - 1
        end = min(offset + size, self.starts[-1])
        while 0 <= i < len(self.ids) and offset < end:
            data = self.chunks.get(self.ids[i])
            lo = offset - self.starts[i]
            hi = min(end - self.starts[i], len(data))
            out.append(bytes(data[lo:hi]))
            offset = self.starts[i] + hi
            i += 1
        if 0 < i < len(self.ids) and i != self.asked_ahead:  # the next chunk, decoded while this one is read
            self.asked_ahead = i
            self.chunks.ahead(self.ids[i])
        return b"".join(out)


class SnapshotFS:
    """The FUSE operations (mfusepy calls them from its threads)."""

    use_ns = True

    def __init__(self, repo: Repository, refresh: float = REFRESH_SECONDS, on_mounted: Any = None,
                 numeric_owner: bool = False, end_retries: Callable[[], None] | None = None):
        self.repo = repo
        self.end_retries = end_retries  # called once libfuse is told to end (``_end_retries_on_exit``)
        self.numeric_owner = numeric_owner
        self._owner_maps: dict[str, OwnerMap] = {}  # snapshot id -> its owners' local ids (``_owners``)
        self.refresh = refresh
        self.on_mounted = on_mounted
        self.served = False  # the kernel mounted it (``init``): an end after that is an unmount
        self._lock = threading.Lock()
        self._listing: threading.Event | None = None  # set once the listing under way ends (``_layout_now``)
        self._told: set[str] = set()  # what made a read fail, said once each on stderr
        self._layout = Layout(repo.snapshots())
        self._given = dict(self._layout.names)  # every snapshot's name as shown: kept across listings
        self._listed = time.monotonic()
        self._list_due = False  # listed again at the next lookup, whatever the refresh: a read found a prune
        self._trees: OrderedDict[str, SnapshotTree] = OrderedDict()
        self._roots: dict[str, Entry | None] = {}  # snapshot id -> its root's entry (``_root_entry``)
        self._building: dict[str, Future[SnapshotTree]] = {}  # snapshot id -> its tree, being read (``_tree``)
        self._trees_dropped = 0  # how many listings have dropped kept trees (``_drop_changed``)
        self._files: dict[int, _File] = {}
        self._dirs: dict[int, _Listing | None] = {}  # directories open, listed once read (``readdir_plus``)
        self._sent_at: OrderedDict[str, float] = OrderedDict()  # directory -> when sent with attributes last
        self._holes: OrderedDict[tuple[str, bytes], list[tuple[int, int]]] = OrderedDict()  # (snapshot, path)
        self._chunks = _Chunks(repo)
        self._ended = threading.Event()  # unmounted
        self._unavailable_until = float("-inf")  # reads fail at once until then: the remote stopped answering
        self._rereading = threading.Lock()  # one thread at a time reads the index again (``_index_read_again``)
        self._index_dropped = float("-inf")  # when an index replaced in the repository was last let go
        self._next_fh = 1
        self.uid, self.gid = os.getuid(), os.getgid()

    # --- lookups ------------------------------------------------------------------------

    def _layout_now(self) -> Layout:
        """The layout, listed again once older than ``refresh``: by a thread of its own, while every operation
        goes on with the one at hand (built under the lock, it stood every operation still for a second at
        2,000 snapshots).  The operation that starts a listing waits for it up to ``LISTING_WAIT`` s, so that
        a snapshot made meanwhile shows at once; never longer: from a remote that stopped answering, it
        waited out the whole retry time (15 min), once every refresh."""
        with self._lock:
            if self._listing is not None or (time.monotonic() - self._listed <= self.refresh and not self._list_due):
                return self._layout
            self._list_due = False
            listed = self._listing = threading.Event()
        threading.Thread(target=self._list_again, args=(listed,), name="mount-listing", daemon=True).start()
        listed.wait(LISTING_WAIT)
        with self._lock:
            return self._layout

    def _list_again(self, listed: threading.Event) -> None:
        layout = self._layout
        try:
            # the index too, once backups added to it: a new snapshot's chunks are in no index read before
            self.repo.store.drop_stale(index=False)
            self._index_read_again(time.monotonic(), relist=False)
            layout = Layout(self.repo.snapshots(), self._given)
            self._given.update(layout.names)
            gap = self.repo.read_lock_removed()
            if gap is not None:
                self._tell(LOCK_REMOVED.format(gap=gap))
        except ChunkvaultError as exc:
            # The snapshots listed before still show (the mount's lock keeps their data), listed again a
            # refresh later: a failed listing failed every lookup with EINVAL, each waiting out the retries.
            self._tell(f"the snapshots could not be listed again: {exc} (those listed before still show)")
        finally:
            with self._lock:
                self._listing = None
                self._drop_changed(self._layout.snapshots, layout.snapshots)  # with the layout: none in between
                self._layout, self._listed = layout, time.monotonic()
            listed.set()

    def _drop_changed(self, before: list[Snapshot], now: list[Snapshot]) -> None:
        """Forget the trees and owners kept of the snapshots whose manifest changed since the last listing, and
        of the differentials built on them: a rewrite or a repair keeps a snapshot's id, and its tree, kept by
        id, showed the paths it removed until an unmount (their bytes readable until a prune, to a mount
        reading without a lock).  Called holding the lock; a tree being read meanwhile is not kept (``_tree``)."""
        old = {s.id: (s.manifest, s.parent) for s in before}
        changed = {s.id for s in now if old.get(s.id, (s.manifest, s.parent)) != (s.manifest, s.parent)}
        if not changed:
            return
        stale = meets({s.id: s.parent for s in now}, changed)
        self._trees_dropped += 1
        for kept in (self._trees, self._owner_maps, self._roots):
            for sid in [sid for sid in kept if stale.get(sid)]:
                del kept[sid]

    def _index_read_again(self, since: float, relist: bool = True) -> bool:
        """Whether the index has been let go since ``since`` for the one stored now (read when next needed),
        by this call or another thread's: after a read begun then failed as missing or damaged data, whether
        the index it followed was replaced meanwhile (a prune or repair), so that the read is worth making
        again.  A mount reading without the lock (``--no-lock``, a read-only token) has prunes run under it.
        Let go here (``relist``), the snapshots are listed again at the next lookup: those listed before
        showed what the prune took with a snapshot forgotten or rewritten, for up to the refresh interval."""
        with self._rereading:
            if self._index_dropped > since:
                return True
            if not self.repo.store.refresh_index():
                return False
            self._index_dropped = time.monotonic()
        if relist:
            with self._lock:
                self._list_due = True
        return True

    def _again_if_moved(self, call: Callable[[], _T]) -> _T:
        """``call()``, made once more where it failed as missing or damaged data and the index it followed was
        replaced meanwhile (``_index_read_again``): a prune repacked what it reads, which the mount read on
        as missing packs (EIO, and ``repair index`` advised) until a lookup listed the snapshots again."""
        since = time.monotonic()
        try:
            return call()
        except CorruptObject:
            try:
                moved = self._index_read_again(since)
            except ChunkvaultError:
                moved = False
            if not moved:
                raise
        return call()

    def _pruned_since(self, since: float) -> bool:
        """Whether an index replaced in the repository was let go after ``since``: data found gone then, that
        was there when its file was opened or its snapshot listed, went with a prune (``PRUNED``), not damage."""
        return self._index_dropped > since

    def _tree(self, snap: Snapshot) -> SnapshotTree:
        with self._lock:
            tree = self._trees.get(snap.id)
            if tree is not None:
                self._trees.move_to_end(snap.id)
                return tree
            # One thread reads it, the others entering it meanwhile wait for that one: each read its own copy
            # (a snapshot of a million files entered by several readers at once, as many times 200 MB).
            building = self._building.get(snap.id)
            dropped = self._trees_dropped
            if building is None:
                building = self._building[snap.id] = Future()
                mine = True
            else:
                mine = False
        if not mine:
            return building.result()  # or the reader's error
        try:
            # outside the lock: other reads go on meanwhile; its chain as listed (the listing refreshes it)
            tree = SnapshotTree(self.repo.tree(snap, snapshots=self._layout.snapshots))
        except BaseException as exc:
            with self._lock:
                del self._building[snap.id]
            building.set_exception(exc)
            raise
        with self._lock:
            del self._building[snap.id]
            # Not kept if a listing found a manifest in its chain changed while it was read, or the snapshot
            # as listed now has another manifest than the one it was read from (found in the listing before):
            # kept by id, the old tree showed what a rewrite removed until an unmount.
            shown = self._layout.by_name.get(self._layout.names.get(snap.id, ""))
            if dropped == self._trees_dropped and (shown is None or shown.manifest == snap.manifest):
                self._trees[snap.id] = tree
            while len(self._trees) > 1 and (len(self._trees) > TREES_KEPT or sum(
                    t.nbytes for t in self._trees.values()) > TREE_BYTES_KEPT):
                self._trees.popitem(last=False)
        building.set_result(tree)
        return tree

    def _node(self, path: str) -> Any:
        node = self._layout_now().resolve(path)
        if node is None:
            raise _error(errno.ENOENT)
        return node

    def _owners(self, snap: Snapshot) -> OwnerMap:
        """The owners (and ACL entries) a restore would give the snapshot's entries: the local ids of their
        recorded names (``OwnerMap``), or the recorded ids with ``numeric_owner``."""
        if self.numeric_owner:
            return OwnerMap()
        with self._lock:
            owners = self._owner_maps.get(snap.id)
        if owners is None:
            if time.monotonic() < self._unavailable_until:
                return OwnerMap()  # the recorded ids for now, asked again once the remote may answer
            try:
                owners = self._again_if_moved(lambda: self.repo.owner_map(snap, snapshots=self._layout.snapshots))
            except RemoteUnavailable as exc:
                # Not kept: kept, the snapshot's owners showed as their recorded ids until an unmount.
                self._unavailable_until = time.monotonic() + UNAVAILABLE_SECONDS
                self._tell(f"snapshot {snap.id[:8]}: {exc} (owners shown as recorded ids meanwhile)")
                return OwnerMap()
            except ChunkvaultError:  # its chain unreadable now: its tree is too, and says so
                owners = OwnerMap()
            with self._lock:
                self._owner_maps[snap.id] = owners
        return owners

    def _tell(self, message: str) -> None:
        """Say once on stderr why a read failed with EIO: the error names the damaged or missing object, as
        every other command's does (the file system can only answer EIO)."""
        with self._lock:
            if message in self._told:
                return
            self._told.add(message)
        warn(message)

    def _in_snapshot(self, node: InSnapshot) -> tuple[SnapshotTree, Entry | None]:
        """The snapshot's tree and the entry at the node (None: a directory without an entry of its own,
        as the root of a snapshot of several paths)."""
        listed = self._listed
        try:
            tree = self._again_if_moved(lambda: self._tree(node.snapshot))
        except ChunkvaultError as exc:  # damaged, or gone with a prune that ran unlocked (--no-lock)
            pruned = isinstance(exc, CorruptObject) and self._pruned_since(listed)
            self._tell(f"snapshot {node.snapshot.id[:8]}: {PRUNED if pruned else exc}")
            raise _error(errno.EIO) from None
        e = tree.content_entry(node.rel)
        if e is None and not tree.is_dir(node.rel):  # not there, or a hard link whose file is not
            raise _error(errno.ENOENT)
        return tree, e

    # --- file system operations ---------------------------------------------------------

    def init(self, path: str) -> None:
        """The kernel has mounted the file system."""
        self.served = True
        exited = _session_exited() if self.end_retries is not None else None
        if exited is not None:
            threading.Thread(target=self._end_retries_on_exit, args=(exited,), name="mount-watch",
                             daemon=True).start()
        if self.on_mounted is not None:
            self.on_mounted()

    def _end_retries_on_exit(self, exited: Callable[[], bool]) -> None:
        """Once libfuse is told to end (Ctrl-C, SIGTERM, SIGHUP, an unmount), its loop waits for the
        operations under way: a read retrying a remote that went away held the mount point hung, and the
        command, for the whole retry time (15 min).  Its retries end now, within seconds."""
        while not self._ended.wait(SESSION_POLL_SECONDS):
            if exited():
                assert self.end_retries is not None
                self.end_retries()
                return

    def destroy(self, path: str) -> None:
        """Unmounted: no read comes any more."""
        self._ended.set()
        self._chunks.close()

    def _root_entry(self, node: InSnapshot) -> Entry | None:
        """A snapshot's root entry, from its tree when that is held, else looked up alone (the first blob of
        each manifest of its chain) and kept: ``ls -l snapshots/`` read the whole tree of every snapshot it
        showed, for its attributes and again for its ACLs.  None: a root without an entry of its own (a
        snapshot of several paths)."""
        sid = node.snapshot.id
        with self._lock:
            tree = self._trees.get(sid)
            if tree is None and sid in self._roots:
                return self._roots[sid]
            dropped = self._trees_dropped
            listed = self._listed
        if tree is not None:
            return self._in_snapshot(node)[1]
        try:
            e: Entry | None = self._again_if_moved(
                lambda: self.repo.find_entry(node.snapshot, b"", snapshots=self._layout.snapshots))
        except UsageError:  # none
            e = None
        except ChunkvaultError as exc:  # damaged, or gone with a prune that ran unlocked (--no-lock)
            pruned = isinstance(exc, CorruptObject) and self._pruned_since(listed)
            self._tell(f"snapshot {sid[:8]}: {PRUNED if pruned else exc}")
            raise _error(errno.EIO) from None
        with self._lock:
            if dropped == self._trees_dropped:  # (as ``_tree`` keeps a tree)
                self._roots[sid] = e
        return e

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        node = self._node(path)
        if not isinstance(node, InSnapshot):
            return self._virtual_attrs(path, node)
        if not node.rel:  # a snapshot's root: listing snapshots/ decodes no tree (one damaged failed it all)
            return self._attrs(node.snapshot, b"", self._root_entry(node), _inode(node.snapshot.id, ""), 1)
        tree, e = self._in_snapshot(node)
        return self._attrs(node.snapshot, node.rel, e, *_file_inode(node.snapshot.id, tree, node.rel))

    def _virtual_attrs(self, path: str, node: Node) -> dict[str, Any]:
        """Attributes of a node above the snapshots' files: a directory, or a link to a snapshot."""
        ino = _inode("", path)
        if isinstance(node, Link):
            return {**self._virtual(stat.S_IFLNK | 0o777, 1), "st_size": len(os.fsencode(node.target)),
                    "st_ino": ino}
        return {**self._virtual(stat.S_IFDIR | 0o555, 2), "st_ino": ino}

    def _attrs(self, snap: Snapshot, rel: bytes, e: Entry | None, ino: int, names: int) -> dict[str, Any]:
        """Attributes of the node at ``rel`` in ``snap`` whose (content) entry is ``e``: None for a directory
        without an entry of its own (above a snapshot's paths)."""
        if e is None:
            return {**self._virtual(stat.S_IFDIR | 0o555, 2), "st_ino": ino}
        ns = e.mtime_ns
        uid, gid = self._owners(snap).ids(e.uid, e.gid)
        return {"st_mode": _TYPE_BITS.get(e.type, stat.S_IFREG) | e.mode, "st_ino": ino,
                "st_nlink": 2 if e.type == T_DIR else names,
                "st_uid": uid, "st_gid": gid, "st_size": e.size if e.type == T_FILE else len(e.target),
                "st_rdev": e.rdev, "st_mtime": ns, "st_atime": ns, "st_ctime": e.ctime_ns or ns,
                "st_blocks": (e.size - sum(n for _, n in self._holes_of(snap, rel, e)) + 511) // 512
                if e.type == T_FILE else 0}

    def _holes_of(self, snap: Snapshot, rel: bytes, e: Entry) -> list[tuple[int, int]]:
        """The file's holes (``Repository.holes``), kept for the files asked last: a file's allocated blocks
        count its data alone, which ``cp`` looks at before it asks where the holes are.  A file too short to
        have one is not kept: ``ls -l`` of a directory of small files pushed out every large file's holes,
        found again at its next getattr (a locate of each of its chunks)."""
        if e.type != T_FILE or e.size < SPARSE_LEAST:
            return []
        key = (snap.id, rel)
        with self._lock:
            holes = self._holes.get(key)
            if holes is not None:
                self._holes.move_to_end(key)
                return holes
        holes = self.repo.holes(e)
        with self._lock:
            self._holes[key] = holes
            while len(self._holes) > HOLES_KEPT:
                self._holes.popitem(last=False)
        return holes

    def _inode(self, path: str, node: Node) -> int:
        """The node's inode number (``_inode``): the same from getattr and from its directory's listing."""
        if not isinstance(node, InSnapshot):
            return _inode("", path)
        if not node.rel:  # a snapshot's root: listing snapshots/ decodes no tree (one damaged failed it all)
            return _inode(node.snapshot.id, "")
        tree, _ = self._in_snapshot(node)
        return _file_inode(node.snapshot.id, tree, node.rel)[0]

    def _dirent(self, path: str, name: str) -> tuple[str, dict[str, Any], int]:
        """A directory's entry as readdir gives it: with its inode number (one of 0 is not listed at all), and
        all its attributes where they cost nothing to find (``readdir``), not for a snapshot's root."""
        child = path.rstrip("/") + "/" + name if name not in (".", "..") else (
            path if name == "." else (path.rstrip("/").rpartition("/")[0] or "/"))
        node = self._node(child)
        if name in (".", "..") or isinstance(node, InSnapshot):
            return name, {"st_ino": self._inode(child, node)}, 0
        return name, self._virtual_attrs(child, node), 0

    def _child_attrs(self, snap: Snapshot, tree: SnapshotTree, rel: bytes) -> dict[str, Any]:
        """What readdir gives of the node at ``rel``: getattr's attributes, or its inode number alone where
        getattr would fail (a hard link whose file the snapshot lacks; an entry that does not load), which
        the kernel then asks getattr for, to fail as it says."""
        ino, names = _file_inode(snap.id, tree, rel)
        try:
            e = tree.content_entry(rel)
            if e is None and not tree.is_dir(rel):
                return {"st_ino": ino}
            return self._attrs(snap, rel, e, ino, names)
        except ChunkvaultError:
            return {"st_ino": ino}

    def _virtual(self, mode: int, nlink: int) -> dict[str, Any]:
        """Attributes of a directory or link above the snapshots' files: the mounting user's, dated by the
        newest snapshot."""
        snaps = self._layout.snapshots
        t = int(datetime.fromisoformat(snaps[-1].time).timestamp() * 10**9) if snaps else 0
        return {"st_mode": mode, "st_nlink": nlink, "st_uid": self.uid, "st_gid": self.gid, "st_size": 0,
                "st_mtime": t, "st_atime": t, "st_ctime": t}

    def _directory(self, path: str, full: bool) -> _Listing:
        """The directory at ``path``: its names, and each one's attributes as getattr gives them (``full``),
        or its inode number alone."""
        node = self._node(path)
        if isinstance(node, VirtualDir):
            names = [".", "..", *node.names]
            return _Listing(names, lambda i: self._dirent(path, names[i])[1])
        if not isinstance(node, InSnapshot):
            raise _error(errno.ENOTDIR)
        tree, _ = self._in_snapshot(node)
        if not tree.is_dir(node.rel):
            raise _error(errno.ENOTDIR)
        # From the tree at hand: resolving each child's path again was a third of a mounted tree's traversal.
        snap, children = node.snapshot, tree.children(node.rel)
        under = node.rel + b"/" if node.rel else b""

        def attrs(i: int) -> dict[str, Any]:
            if i < 2:
                return self._dirent(path, (".", "..")[i])[1]
            rel = under + children[i - 2]
            return self._child_attrs(snap, tree, rel) if full else {"st_ino": _file_inode(snap.id, tree, rel)[0]}

        return _Listing([".", "..", *map(os.fsdecode, children)], attrs)

    def readdir(self, path: str, fh: int | None = None) -> list[tuple[str, dict[str, Any], int]]:
        listing = self._directory(path, full=False)
        return [(name, listing.attrs(i), 0) for i, name in enumerate(listing.names)]

    def opendir(self, path: str) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._dirs[fh] = None
        return fh

    def releasedir(self, path: str, fh: int) -> int:
        with self._lock:
            self._dirs.pop(fh, None)
        return 0

    def readdir_plus(self, path: str, fh: int, offset: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """The entries of the directory open as ``fh`` from ``offset`` on, each with its attributes (the
        kernel then looks none of them up), found as each entry is sent.  Listed once for the calls that
        send it a buffer at a time (listed for each, a directory of 100,000 names took some 4,000 listings).
        A directory sent with attributes less than ``refresh`` s ago is sent without: the kernel holds them
        as long, and finding them again took a tree's second traversal five times as long as the first."""
        with self._lock:
            listing = self._dirs.get(fh)
        if listing is None or offset == 0:
            now = time.monotonic()
            with self._lock:
                full = now - self._sent_at.get(path, -math.inf) >= self.refresh
                if full:
                    self._sent_at[path] = now
                    self._sent_at.move_to_end(path)
                    while len(self._sent_at) > SENT_KEPT:
                        self._sent_at.popitem(last=False)
            listing = self._directory(path, full)
            with self._lock:
                if fh in self._dirs:
                    self._dirs[fh] = listing
        for i in range(offset, len(listing.names)):
            yield listing.names[i], listing.attrs(i)

    def readlink(self, path: str) -> str:
        node = self._node(path)
        if isinstance(node, Link):
            return node.target
        if isinstance(node, InSnapshot):
            _, e = self._in_snapshot(node)
            if e is not None and e.type == T_SYMLINK:
                return os.fsdecode(e.target)
        raise _error(errno.EINVAL)

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT):
            raise _error(errno.EROFS)
        node = self._node(path)
        listed = self._listed
        if not isinstance(node, InSnapshot):
            raise _error(errno.EISDIR)
        _, e = self._in_snapshot(node)
        if e is None or e.type == T_DIR:
            raise _error(errno.EISDIR)
        if e.type != T_FILE:
            raise _error(errno.ENXIO)
        if unread(e):  # no data: an empty file would pass for its content, as restore and dump know
            self._tell(f"{shown_name(path)}: no backup could read this file; the snapshot holds no data for it")
            raise _error(errno.EIO)
        try:
            f = _File(path, e, self._chunks, node)
        except ChunkvaultError as exc:  # a chunk in no index: damage, or what a prune took since the listing
            pruned = not isinstance(exc, RemoteError) and self._pruned_since(listed)
            self._tell(f"{shown_name(path)}: {PRUNED if pruned else exc}")
            raise _error(errno.EIO) from None
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = f
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        f = self._files.get(fh)
        if f is None:
            raise _error(errno.EBADF)
        if time.monotonic() < self._unavailable_until:  # said already
            raise _error(errno.EIO)
        try:
            return self._again_if_moved(lambda: f.read(size, offset))
        except RemoteUnavailable as exc:
            # The kernel asks again for a page whose read-ahead failed: each ask waited out the retry time anew.
            self._unavailable_until = time.monotonic() + UNAVAILABLE_SECONDS
            self._tell(f"{shown_name(f.path)}: {exc} (reads fail at once for {UNAVAILABLE_SECONDS:.0f} s)")
            raise _error(errno.EIO) from None
        except ChunkvaultError as exc:
            pruned = isinstance(exc, CorruptObject) and self._pruned_since(f.opened)
            self._tell(f"{shown_name(f.path)}: {PRUNED if pruned else exc}")
            raise _error(errno.EIO) from None

    def lseek(self, path: str, offset: int, whence: int, fh: int) -> int:
        """SEEK_DATA and SEEK_HOLE (the kernel answers the other kinds): runs of 1 MiB or more of chunks of
        zeros are holes, as ``dump`` leaves them out of a tar, so ``cp`` and ``tar -S`` copying a sparse file
        out of the mount skip them, unread, and keep them holes."""
        f = self._files.get(fh)
        if f is None:
            raise _error(errno.EBADF)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise _error(errno.EINVAL)
        holes = self._holes_of(f.node.snapshot, f.node.rel, f.entry)
        at = seek_data_or_hole(holes, f.entry.size, offset, whence == os.SEEK_HOLE)
        if at is None:
            raise _error(errno.ENXIO)
        return at

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self._files.pop(fh, None)
        return 0

    def _xattrs(self, path: str) -> dict[bytes, bytes]:
        """The extended attributes recorded for a node (none above the snapshots' files)."""
        node = self._node(path)
        if not isinstance(node, InSnapshot):
            return {}
        e = self._in_snapshot(node)[1] if node.rel else self._root_entry(node)
        if e is None or not e.xattrs:
            return {}
        try:
            return decode_xattrs(self._owners(node.snapshot).entry(e).xattrs)
        except ValueError:
            raise _error(errno.EIO) from None

    def listxattr(self, path: str) -> list[str]:
        return [os.fsdecode(n) for n in self._xattrs(path)]

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        value = self._xattrs(path).get(os.fsencode(name))
        if value is None:
            raise _error(errno.ENODATA)
        return value

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}


def _error(code: int) -> OSError:
    return _fuse().FuseOSError(code)


def _check_mountpoint(mountpoint: str) -> None:
    """An empty directory, or one clear line on what it is instead."""
    try:
        st = os.stat(mountpoint)
        empty = not stat.S_ISDIR(st.st_mode) or not os.listdir(mountpoint)
    except FileNotFoundError:
        raise UsageError(f"{mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a FUSE mount whose process is gone (killed, out of memory)
            dead = _dead_mount(mountpoint)
            raise UsageError(f"{dead} is still mounted by a mount that is gone: unmount it first "
                             f"(fusermount -u {dead})") from None
        raise UsageError(f"cannot use {mountpoint} as a mount point: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{mountpoint} is not a directory")
    if not empty:
        raise UsageError(f"{mountpoint} is not empty" + (" (a mount point already)" if os.path.ismount(mountpoint)
                                                         else ""))


def _dead_mount(path: str) -> str:
    """The directory a dead FUSE mount is at: ``path`` or the highest of its parents that answers ENOTCONN."""
    path = os.path.abspath(path)
    while os.path.dirname(path) != path:
        try:
            os.stat(os.path.dirname(path))
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                path = os.path.dirname(path)
                continue
        break
    return path


def mount(repo: Repository, mountpoint: str, *, allow_other: bool = False, wait: float = 3600.0,
          refresh: float = REFRESH_SECONDS, on_mounted: Any = None, numeric_owner: bool = False) -> None:
    """Mount the repository's snapshots read-only at ``mountpoint`` until it is unmounted (``fusermount -u``,
    or SIGINT/SIGTERM/SIGHUP/SIGQUIT to this process); ``on_mounted()`` is called once it is.  ``allow_other``: other users may look too, each held to the
    recorded owners and modes (without it only the mounting user can, and reads every file).  Owners show
    as a restore would set them: the local ids of their recorded names, unless ``numeric_owner``."""
    _check_mountpoint(mountpoint)
    fuse = _fuse()
    home = _working_directory()

    def mounted() -> None:
        _return_to(home)
        if on_mounted is not None:
            on_mounted()

    left = locks.left_behind()
    # the lock is given back (``reading``) while the retries are still ended: to a remote gone, at once
    with contextlib.ExitStack() as stack, repo.retries_ended_by() as end_retries, repo.reading("mount", wait=wait):
        if home is not None:
            stack.callback(os.close, home)
            stack.callback(_return_to, home)
        ops = SnapshotFS(repo, refresh, mounted, numeric_owner, end_retries)
        options: dict[str, Any] = {"use_ino": True,  # getattr's inode numbers: hard links share theirs
                                   "entry_timeout": refresh, "attr_timeout": refresh, "kernel_cache": True}
        if getattr(fuse, "fuse_version_major", 2) >= 3:
            # libfuse 3.14's own default (unlimited) fails its own check, and it said so at every mount; 10 is
            # its default of threads at most, so no idle thread is ended either way (libfuse 2 lacks the option)
            options["max_idle_threads"] = 10
        if allow_other:
            options.update(allow_other=True, default_permissions=True)
        # libfuse unmounts on SIGTERM and SIGHUP with handlers of its own, which it installs only over the
        # default (the command line's handler raises in Python code, which does not run while libfuse serves).
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = {signum: signal.signal(signum, signal.SIG_DFL) for signum in (signal.SIGTERM, signal.SIGHUP)
                    if on_main_thread and signal.getsignal(signum) is not signal.SIG_IGN}
        relay = _QuitRelay() if on_main_thread and signal.getsignal(signal.SIGQUIT) is not signal.SIG_IGN else None
        try:
            _fuse_class(fuse)(ops, mountpoint, foreground=True, ro=True, fsname="chunkvault", **options)
        except RuntimeError as exc:  # libfuse could not mount (no /dev/fuse, no permission, ...)
            if not ops.served or exc.args != (_LOOP_ENDED_BY_SIGNAL,):  # else libfuse 3 unmounted on a signal
                raise _mount_failed(mountpoint, exc, ops.served) from None
        finally:
            # Unmounted (a signal, an unmount), or never mounted: the lock is removed as after Ctrl-C, within
            # seconds.  The watch (``_end_retries_on_exit``) misses an end that comes with no read under way,
            # and the lock's removal then retried a remote gone for the whole outage time (15 min).
            end_retries()
            if relay is not None:
                relay.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if locks.left_behind() - left:
        warn("the mount's lock could not be removed from the repository (out of reach): it goes stale by itself, "
             "and the next command on this host removes it")


def _working_directory() -> int | None:
    """The working directory, held open: libfuse 3 changes to / as it mounts, in the foreground too, where
    the caller (a relative mount point's --json document, a program going on after the mount) keeps its own."""
    try:
        return os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def _return_to(home: int | None) -> None:
    if home is not None:
        try:
            os.fchdir(home)
        except OSError:
            pass


def _mount_failed(mountpoint: str, exc: RuntimeError, served: bool) -> MountFailed:
    """The error for libfuse's failure.  mfusepy raises fuse_main's return code, a number that means nothing
    to the user (it said "cannot mount at /mnt: 1"); libfuse or fusermount has written why on stderr."""
    why = "libfuse's message above says why" if exc.args and isinstance(exc.args[0], int) else str(exc)
    if served:
        return MountFailed(f"the mount at {mountpoint} ended with an error ({why})")
    return MountFailed(f"cannot mount at {mountpoint} ({why})")


class _QuitRelay:
    """SIGQUIT ends a mount as SIGTERM does.  libfuse handles SIGTERM, SIGHUP and SIGINT itself, but not
    SIGQUIT, whose Python handler would wait for libfuse's loop to return: the signal is written to a wakeup
    pipe instead (in C, as it lands), and a thread turns it into a SIGTERM for libfuse."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._handler = signal.signal(signal.SIGQUIT, lambda signum, frame: None)
        self._wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="sigquit-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while data := os.read(self._read, 64):
            if signal.SIGQUIT in data:
                os.kill(os.getpid(), signal.SIGTERM)

    def close(self) -> None:
        signal.set_wakeup_fd(self._wakeup)
        signal.signal(signal.SIGQUIT, self._handler)
        os.close(self._write)  # the thread reads the end of the pipe
        self._thread.join(5)
        os.close(self._read)
