"""An open repository: keys, config, the blob index, blob reads and writes, snapshots.

This is the store's I/O hub; the backup, restore and lifecycle modules build
on it.  It talks to any Remote and never to the file system directly.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
import time
import warnings
import weakref
from collections import ChainMap, Counter, OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, TypeVar


from chunkvault.chunker import Chunker, ChunkerParams
from chunkvault.errors import (
    AmbiguousId,
    ChunkvaultError,
    CorruptObject,
    LockLost,
    MissingObject,
    NewerObject,
    NoSuchObject,
    ObjectArchived,
    ObjectExists,
    ObjectNotFound,
    PermissionDenied,
    RemoteError,
    RemoteRetryWarning,
    RemoteUnavailable,
    RepositoryExists,
    RepositoryStateWarning,
    UsageError,
    WrongPassword,
)
from chunkvault.remotes import ObjectInfo, Remote
from chunkvault.remotes.layer import parallel_map

from . import chain
from .blob import (KIND_DELTA, MAX_DELTA_DEPTH, Plaintext, compress, compress_many, delta_compress,
                   envelope_base, open_chain, open_envelope, sampled_size, seal_blob, seal_whole_blobs)
from .blobindex import BlobIndex, BlobLocation
from .config import (FORMAT_XATTRS, MAX_PACK_SIZE, KeyFile, RepoConfig, Settings, changed_settings, make_key_file,
                     new_config, open_config, settings_differences)
from .crypto import BlobHasher, KeyMaterial, Sealer, content_name
from .deltabase import choose_base
from .indexfile import (INDEX_SLACK, IndexColumns, IndexData, decode_index, decode_index_columns, encode_index,
                        pack_index_bytes)
from .manifest import OP_DELETE, Record, decode_records, iter_records
from .manifest_seek import ManifestSeeker, Segment, segments
from .pack import EncodedEntries, PackBuffers, PackBuilder, PackEntry, entry_bytes, fetch_header
from .packranges import RecentRanges
from .chronology import chronological_key
from .snapshot import Snapshot
from .unlock import (KEY_IMPORT_HINT, Unlocked, nested_hint, only_keys_hint, password_for, read_key_file,
                     repository_objects, require_openable, unlock)

if TYPE_CHECKING:
    from .locks import RepoLock

IndexT = TypeVar("IndexT", IndexData, IndexColumns)
T = TypeVar("T")

WORKERS = max(2, os.cpu_count() or 2)
# Manifest blobs read in one go (neighbours in a pack: one request) by a walk of many, and at most this
# many plaintext bytes of them: a window of such reads holds a few MiB, whatever the chunk size.
MANIFEST_BATCH = 32
MANIFEST_BATCH_BYTES = 1 << 20
OBJECT_READERS = 8  # small objects (index, snapshots) read at once: on a remote, each read waits a round trip
SNAPSHOT_READERS = 16  # snapshot objects read at once off local disk: as many as the HTTP and S3 pools connect
# A delta under this share of the whole blob's stored size skips the plain compression it is
# weighed against: a chunk that similar never compressed to near half its base (store/FORMAT.md).
SKIP_PLAIN_SHARE = 0.5
# Or under this share of the plain size estimated from a sample (blob.sampled_size): a chain restart,
# whose delta holds a chain's changes, against an old whole blob that compressed far better than the
# chunk does now.  The estimate came within 1.2 times the real size for 95 % of database chunks.
SKIP_SAMPLED_SHARE = 0.7
# Blobs of one pack closer than this are read with one ranged request, the bytes between them along: on
# local disk (cheap ranges) a little more than a read costs, elsewhere about what one more request costs.
# What a remote read brings along is kept (RECENT_RANGES_BYTES) for the next reads (store/packranges.py).
READ_GAP_LOCAL = 64 << 10
READ_GAP_REMOTE = 1 << 20
RECENT_RANGES_BYTES = 32 << 20
COPY_TRIES = 4  # times one read goes over to another copy of a blob it reads (``Repo._resolve``)


#: A blob the index does not list: lost, or in a pack whose index object was lost.
NOT_INDEXED = ("not in the index (`repair index` finds it if a pack still holds it; if none does, `repair "
               "snapshots` drops the files that need it)")


def pack_key(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"data/{h[:2]}/{h}"


def pack_id_of(key: str) -> bytes | None:
    """The pack a ``data/`` key holds; None for any other object (a stray file, or a pack's copy in another
    folder, which a listing by name alone had counted as the pack itself)."""
    name = key.rsplit("/", 1)[-1]
    if not OBJECT_ID.fullmatch(name) or key != pack_key(pid := bytes.fromhex(name)):
        return None
    return pid


class PreparedBlob(NamedTuple):
    blob_id: bytes
    kind: int
    envelope: bytes
    raw_length: int
    base_id: bytes | None


#: The blob cache's bounds: plaintext bytes, and blobs.  An entry costs some 200 bytes beside its plaintext
#: (its id, the bytes object, the ordered dict's slot and link): bounded in bytes alone, 256 MiB of blobs of
#: 256 bytes was a million entries, 450 MB held.
CACHE_BYTES = 256 << 20
CACHE_BLOBS = 1 << 16


class _LRU:
    """Plaintext blob cache bounded in bytes and in blobs (delta bases, manifest pieces).  A blob put ``once``
    (read ahead for one reader) leaves at its first hit, or at the last of as many as readers ``expect`` it: a
    chain's manifests read ahead stayed up to the cache's size, pushing out the delta bases it is for, and a
    diff's two chains share theirs (one walk's hit took a blob the other had been promised)."""

    def __init__(self, max_bytes: int, max_blobs: int = CACHE_BLOBS):
        self.max_bytes = max_bytes
        self.max_blobs = max_blobs
        self.size = 0
        self.items: OrderedDict[bytes, Plaintext] = OrderedDict()
        self.once: dict[bytes, int] = {}  # hits left before the blob leaves
        self.lock = threading.Lock()

    def get(self, key: bytes) -> Plaintext | None:
        with self.lock:
            v = self.items.get(key)
            if v is None:
                return None
            if key in self.once:
                self._take(key)
            else:
                self.items.move_to_end(key)
            return v

    def peek(self, key: bytes) -> Plaintext | None:
        """The blob without taking a hit promised to a reader (a delta's base looked up on the way)."""
        with self.lock:
            v = self.items.get(key)
            if v is not None and key not in self.once:
                self.items.move_to_end(key)
            return v

    def put(self, key: bytes, value: Plaintext, *, once: bool = False) -> None:
        if len(value) > self.max_bytes:
            return
        with self.lock:
            if key in self.items:
                if once:
                    self._promise(key)
                return
            self.items[key] = value
            self.size += len(value)
            if once:
                self.once[key] = 1
            while self.size > self.max_bytes or len(self.items) > self.max_blobs:
                self._pop(next(iter(self.items)))

    def expect(self, keys: Iterable[bytes]) -> list[bytes]:
        """One more hit promised for each of ``keys`` the cache holds; the others, to be read and ``put``."""
        with self.lock:
            missing = []
            for key in keys:
                if key in self.items:
                    self._promise(key)
                else:
                    missing.append(key)
            return missing

    def forgo(self, keys: Iterable[bytes]) -> None:
        """One hit promised for each of ``keys`` taken back (the walk it was promised to failed): kept, each
        later walk's promise and hit left it counting that one, and it stayed in the cache for good."""
        with self.lock:
            for key in keys:
                if key in self.once:
                    self._take(key)

    def drop(self, keys: Iterable[bytes]) -> None:
        with self.lock:
            for key in keys:
                if key in self.items:
                    self._pop(key)

    def _take(self, key: bytes) -> None:
        """One promised hit of ``key`` had or given up: the last leaves the cache."""
        if self.once[key] > 1:
            self.once[key] -= 1
        else:
            self._pop(key)

    def _promise(self, key: bytes) -> None:
        if key in self.once:  # a blob kept for every reader stays so
            self.once[key] += 1

    def _pop(self, key: bytes) -> None:
        self.size -= len(self.items.pop(key))
        self.once.pop(key, None)


#: A ranged read of a pack: its key, the range [start, end), and the (offset, length, blob id, raw length) of
#: each blob it holds.
_Run = tuple[str, int, int, list[tuple[int, int, bytes, int]]]

OBJECT_ID = re.compile("[0-9a-f]{64}")  # the name of a pack, an index object or a snapshot


def new_snapshot_id() -> str:
    """A new snapshot's id: random, never reused."""
    return os.urandom(32).hex()


def superseded_names(objects: Iterable[IndexColumns | IndexData]) -> set[str]:
    """The names of the index objects these supersede."""
    return {s.hex() for d in objects for s in d.supersedes}


def _stored_config(remote: Remote) -> bytes | None:
    """The config object as stored: ``b""`` when there is none, None when that cannot be told (an init that
    failed then keeps its key file: removed beside a config written after all, the repository would be lost)."""
    try:
        return remote.get("config")
    except ObjectNotFound:
        return b""
    except Exception:
        return None


class Repo:
    max_delta_depth = MAX_DELTA_DEPTH  # reads refuse longer chains; backups never write them

    def __init__(self, remote: Remote, material: KeyMaterial, config: RepoConfig, key_name: str):
        self.remote = remote
        self.material = material
        self.config = config
        self.key_name = key_name
        self.key_left: str | None = None  # a key a failed password change stored and did not take back
        self.key_found: str | None = None  # the key `add_key` found its password opens already, adding none
        self.sealer = Sealer(material.enc_key)
        self.blob_id = BlobHasher(material.id_key)
        self.chunker_params = ChunkerParams.from_dict(config.settings.chunker)
        self.chunker = Chunker(material.chunker_secret, self.chunker_params)
        self._index: BlobIndex | None = None
        self._index_names: set[str] = set()  # the index objects listed when it loaded, and those written since
        self.pack_ids: list[bytes | None] = []
        self._pack_nos: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._index_lock = threading.RLock()
        self._cache = _LRU(CACHE_BYTES)
        self._read_gap = READ_GAP_LOCAL if remote.cheap_ranges else READ_GAP_REMOTE
        self._recent = None if remote.cheap_ranges else RecentRanges(RECENT_RANGES_BYTES)
        self._snapshots: dict[str, Snapshot] = {}
        self._format_refused = False  # the remote would not rewrite the config (``raise_format``)
        # (size, version) of each snapshot object read: another command's rewrite (a rebase, a tag) shows in
        # the listing's version; where the remote gives none (an older service), each listing reads it again.
        self._snapshot_seen: dict[str, tuple[int, str | None]] = {}
        # Each snapshot as decoded from the object version a listing showed, a copy no command edits: taking
        # a lock drops the snapshots loaded, and a process kept open re-read every one at each lock (8,000
        # snapshots: 0.35 s of a 0.9 s backup).  Listed again at the same version, it is copied from here.
        self._decoded: dict[str, tuple[tuple[int, str], Snapshot]] = {}
        self.unreadable_snapshots: dict[str, CorruptObject] = {}  # as of the last listing (``snapshots``)
        # The last listing by id, and whether a lock this process holds keeps it true (``kept_listing``).
        self._listing: dict[str, Snapshot] | None = None
        self._listing_era = 0  # moved on by ``drop_stale``: a listing begun before it is not kept
        self.listing_kept: Callable[[], bool] = lambda: False
        self._kept_chains: tuple[dict[str, Snapshot], Callable[[Snapshot], list[Snapshot]]] | None = None
        # A digest of each snapshot object's stored bytes as read or written: the ledger tells versions apart
        # by it (an older version put back authenticates as well as the newer).
        self.snapshot_digests: dict[str, str] = {}
        self.replaced_digests: dict[str, list[tuple[str, str]]] = {}  # (old, new) of each rewrite, till taken
        # Told of each new snapshot stored under a lock, while the lock is still held (the client's ledger):
        # noted after, a forget of it by another command of the client could come first, and be undone.
        self.on_saved: Callable[..., None] | None = None  # each call: one snapshot, or several (``saves_noted_together``)
        self._saves_held = threading.local()  # .batch: this thread's new snapshots not told yet
        self._warned_indexes: set[str] = set()
        # The copies of a blob stored more than once that the index does not point at, each with its base
        # (None for one stored whole): a read falls back on one when the copy it read fails (``_other_copy``).
        self._copies: dict[bytes, list[tuple[BlobLocation, bytes | None]]] = {}
        self._copy_switches = 0  # how many times a read went over to another copy
        # The index ``install_packs`` returned (a prune's table of the copies it keeps, each row pointing at
        # the entry kept): a read that goes over to another copy of a blob does so in a copy of it
        self._lent: weakref.ref[BlobIndex] | None = None
        # The deltas left out of the index for a writer, each with its base (None: not yet known).  A reader
        # holding the index as it was (a repair's) still follows such a delta's chain to the base it lacks.
        self._withheld: dict[bytes, bytes | None] | None = None
        self._writers = 0  # BlobWriters filling the index: it is not dropped meanwhile (``refresh_index``)
        # One writer at a time (nested in one thread aside): one that stops short leaves in the index blobs
        # that no index object lists, perhaps in packs never stored, which another deduplicating meanwhile
        # would refer to.  Such a writer marks the index unsettled: it is read again before the next one.
        self._writer_lock = threading.RLock()
        self._index_unsettled = False

    # --- creation and opening -------------------------------------------------

    @classmethod
    def init(cls, remote: Remote, password: bytes, *, settings: Settings | None = None,
             kdf_seconds: float = 0.5, kdf_log_n: int | None = None,
             chunker_secret: bytes | None = None) -> "Repo":
        if not password:
            raise UsageError("an empty password is not allowed")
        if remote.stat("config") is not None:
            raise RepositoryExists(f"a repository already exists at {remote.display_url}")
        outer = remote.enclosing_repository()
        if outer is not None:
            raise RepositoryExists(f"{remote.display_url} lies inside the repository at {outer}, which would take "
                                   "this one's objects for its own: choose a place outside it")
        leftovers = repository_objects(remote)
        if leftovers.own:
            raise RepositoryExists(f"{remote.display_url} holds repository objects ({', '.join(leftovers.own)}) but "
                                   "no config: a repository lost its config there; not creating one over it"
                                   + only_keys_hint(leftovers.own))
        if leftovers.nested:
            raise RepositoryExists(f"{remote.display_url} holds the repository at "
                                   f"{nested_hint(remote, leftovers.nested)}, whose objects one made here would take "
                                   "for its own: choose another place")
        if settings is None:
            settings = Settings(chunker=ChunkerParams().to_dict())
        ChunkerParams.from_dict(settings.chunker)  # validates
        material = KeyMaterial.generate()
        if chunker_secret is not None:
            material = KeyMaterial(material.enc_key, material.id_key, chunker_secret)
        config = new_config(settings)
        name, data = make_key_file(material, password, config.repo_id, kdf_seconds=kdf_seconds, log_n=kdf_log_n)
        remote.put(f"keys/{name}", data, if_absent=True)
        encoded = config.encode(Sealer(material.enc_key))
        try:
            remote.put("config", encoded, if_absent=True)
        except BaseException as exc:
            stored = _stored_config(remote)
            if stored == encoded and isinstance(exc, Exception):  # written after all (a try whose reply was lost)
                return cls(remote, material, config, name)
            if stored is not None and stored != encoded:  # the config is another init's, or none was written
                try:  # a key file alone made the location a repository that lost its config, for good
                    remote.delete(f"keys/{name}")
                except Exception:
                    pass
            if isinstance(exc, ObjectExists):
                raise RepositoryExists(f"a repository already exists at {remote.display_url}") from None
            raise
        return cls(remote, material, config, name)

    @classmethod
    def open(cls, remote: Remote, password: bytes | Unlocked) -> "Repo":
        """Open with a password, or with what ``unlock`` already opened."""
        key = password if isinstance(password, Unlocked) else unlock(remote, password)
        return cls(remote, key.material, key.config, key.key_name)

    # --- keys -------------------------------------------------------------------

    def list_keys(self) -> tuple[list[KeyFile], dict[str, CorruptObject]]:
        """The key files, oldest first, and those that do not decode (name -> error: `key remove` them)."""
        out, damaged = [], {}
        for o in self.remote.list("keys/"):
            name = o.key.split("/", 1)[1]
            try:
                out.append(KeyFile.decode(name, read_key_file(self.remote, name)))
            except CorruptObject as exc:
                damaged[name] = exc
        return sorted(out, key=lambda k: (k.created, k.name)), damaged

    def key_problem(self, kf: KeyFile) -> str | None:
        """Why the readable key file ``kf`` opens nothing here, or None: another repository's (copied or planted
        here), or asking for more derivation than chunkvault writes (never derived)."""
        if kf.repo and kf.repo != self.config.repo_id:
            return f"made for another repository ({kf.repo[:16]}): it opens nothing here"
        return kf.cost_problem()

    def add_key(self, password: bytes, *, kdf_seconds: float = 0.5, kdf_log_n: int | None = None) -> str:
        """A key file for ``password``; where a key opens with it already, that key's id, none added (``key_found``
        says so): a second key for one password outlived a `key passwd` of it, which replaces the key it opened
        with, so the old password still opened.  Run again after a crash, it finds the key the first run added."""
        readable, _ = self.list_keys()
        self.key_found = self._key_opened_by(readable, password)
        if self.key_found is not None:
            return self.key_found
        name, data = self._key_file(password, kdf_seconds, kdf_log_n)
        self.remote.put(f"keys/{name}", data, if_absent=True)
        return name

    def _key_file(self, password: bytes, kdf_seconds: float, kdf_log_n: int | None = None) -> tuple[str, bytes]:
        if not password:
            raise UsageError("an empty password is not allowed")
        return make_key_file(self.material, password, self.config.repo_id, kdf_seconds=kdf_seconds, log_n=kdf_log_n)

    def remove_key(self, name: str, *, wait: float = 0.0) -> str:
        """Remove the key file ``name`` (an id or unique prefix) and return its id.  Under the exclusive lock
        (waiting up to ``wait`` seconds for it), and only while the opening key is still there and another
        readable key remains: two removals at once each took the other's key, and no key opened the
        repository again."""
        from .locks import EXCLUSIVE, RepoLock

        with RepoLock(self.remote, EXCLUSIVE, "key remove", wait=wait) as lock:
            readable, damaged = self.list_keys()
            names = [k.name for k in readable]
            if self.key_name in damaged:  # a read cut short, or a damaged file: not removed by another command
                raise damaged[self.key_name].explained("; nothing removed")
            if self.key_name not in names:
                raise UsageError("the key this repository was opened with is gone (another command removed it): "
                                 "nothing removed")
            matches = _keys_named(name, names + list(damaged))
            if not matches:
                raise NoSuchObject(f"no key {name!r} (`key list` shows them)")
            if len(matches) > 1:
                raise AmbiguousId(f"key {name!r} is ambiguous: {', '.join(_distinct_prefixes(matches))}")
            if matches[0] == self.key_name:
                raise UsageError("refusing to remove the key this repository was opened with (use another password)")
            if not [k for k in names if k != matches[0]]:
                raise UsageError("refusing to remove the last key that opens the repository")
            lock.ensure_held()
            self.remote.delete(f"keys/{matches[0]}")
            return matches[0]

    def replace_key(self, password: bytes, *, kdf_seconds: float = 0.5, wait: float = 0.0) -> str:
        """A key for ``password`` in place of the one this repository was opened with (a password change);
        returns the new key's id.  The exclusive lock comes first (waiting up to ``wait`` seconds): a token
        that may not take it (append-only) changes nothing, where the new key used to be added and could not
        be taken back, leaving one more password that opens the repository.  Where the change fails or is
        stopped once the new key is stored, it is taken back unless the old one is already gone; the error
        (or, when stopped, a warning) says which passwords open the repository."""
        from .locks import EXCLUSIVE, RepoLock

        old = self.key_name
        locked = False
        try:
            with RepoLock(self.remote, EXCLUSIVE, "key passwd", wait=wait) as lock:
                locked = True
                new = self._replace_key_locked(old, password, kdf_seconds, lock)
        except ChunkvaultError as exc:
            if locked:
                raise
            raise exc.explained("; the password is unchanged") from None  # locked, or a token that may not lock
        self.key_name = new
        return new

    def _replace_key_locked(self, old: str, password: bytes, kdf_seconds: float, lock: RepoLock) -> str:
        try:
            keys, damaged = self.list_keys()
        except ChunkvaultError as exc:
            raise exc.explained("; the password is unchanged") from None
        if old in damaged:  # a read cut short, or a damaged file: there, not replaced by another command
            raise damaged[old].explained("; the password is unchanged")
        if old not in [k.name for k in keys]:
            raise UsageError("the key this repository was opened with is gone (another command replaced it): "
                             "nothing changed; use the password that command set")
        try:  # the old key's deletion denied once the new one is stored: both would open, and the new be left
            self.require_deletes(f"keys/{'0' * 32}", "key passwd")
        except ChunkvaultError as exc:
            raise exc.explained("; the password is unchanged") from None
        left = self._key_opened_by([k for k in keys if k.name != old], password)
        if left is not None:
            lock.ensure_held()
            self.remote.delete(f"keys/{old}")
            return left
        new, data = self._key_file(password, kdf_seconds)
        try:
            self.remote.put(f"keys/{new}", data, if_absent=True)
            lock.ensure_held()
            self.remote.delete(f"keys/{old}")
        except BaseException as exc:
            left = self._undo_new_key(old, new)
            if not isinstance(exc, ChunkvaultError):
                warnings.warn(f"stopped: {left}", RepositoryStateWarning, stacklevel=3)
                raise
            raise exc.explained(f"; {left}") from None
        return new

    def _key_opened_by(self, keys: list[KeyFile], password: bytes) -> str | None:
        """The first of ``keys`` that ``password`` opens to this repository's key (one derivation a key tried;
        a key asking for more than chunkvault writes is not tried).  A password change to a password a key has
        already keeps that key and removes the old, adding none: what a change stopped between storing the new
        key and removing the old one left, or an older key, which a second key for its password would outlive
        the next change of it.  Cheapest first, and none made for another repository (its id in clear), which
        never opens this one: each was derived, one planted at the largest cost allowed a minute."""
        for kf in sorted(keys, key=lambda k: k.work):
            if kf.cost_problem() is not None or (kf.repo and kf.repo != self.config.repo_id):
                continue
            try:
                material = kf.unwrap(password_for(kf, password), self.config.repo_id)
            except (WrongPassword, CorruptObject):
                continue
            if material == self.material:
                return kf.name
        return None

    def _undo_new_key(self, old: str, new: str) -> str:
        """After a password change failed with key ``new`` stored (or maybe stored): take it back while
        ``old`` is there, and say which passwords open the repository."""
        self.key_left = new
        try:
            if not self.remote.exists(f"keys/{old}"):
                self.key_name = new
                return f"the old key was removed: only the new password opens the repository (key {new[:12]})"
            self.remote.delete(f"keys/{new}")
        except BaseException:
            return (f"key {new[:12]} was added and the old password may no longer open the repository "
                    "(`key list` says which keys are left)")
        self.key_left = None
        return "the password is unchanged"

    def change_settings(self, changes: dict[str, Any], *, wait: float = 0.0) -> dict[str, tuple[Any, Any]]:
        """Apply ``changes`` (``config.CHANGEABLE_SETTINGS`` names to values) to the config as stored now and
        rewrite it; returns name -> (old, new) of what changed (nothing written when nothing does).

        Under the exclusive lock (waiting up to ``wait`` seconds): a backup running meanwhile keeps the
        settings it opened with, and two changes at once would each put back what the other set.  The config
        is read again under the lock, so a change another command made since this one opened is kept.  Every
        remote replaces an object whole (a temporary name renamed over it, or one S3 PUT): a crash leaves the
        old config or the new one."""
        from .locks import EXCLUSIVE, RepoLock

        changed_settings(self.config.settings, changes)  # a bad name or value is refused before the lock
        with RepoLock(self.remote, EXCLUSIVE, "config set", wait=wait) as lock:
            stored = self.stored_config()
            new = changed_settings(stored.settings, changes)
            differences = settings_differences(stored.settings, new)
            if differences:
                stored.settings = new
                lock.ensure_held()
                self.remote.put("config", stored.encode(self.sealer))
            self.config = stored
        return differences

    def stored_config(self, raw: bytes | None = None) -> RepoConfig:
        """The config as stored now (or ``raw``, as a command just read it), opened with this repository's
        key: a CorruptObject for one missing, damaged or another repository's (``key import`` puts it back)."""
        if raw is None:
            raw = require_openable(self.remote, self.config.repo_id)
        try:
            config = open_config(raw, self.sealer)
        except CorruptObject as exc:
            raise exc.explained(KEY_IMPORT_HINT) from None
        if config.repo_id != self.config.repo_id or config.settings.chunker != self.config.settings.chunker:
            raise CorruptObject("config", "its id or chunker parameters are not those this repository was opened "
                                          "with (no chunkvault changes them)")
        return config

    def raise_format(self, fmt: int) -> None:
        """Store the config at format ``fmt`` before writing what a chunkvault of an earlier format would misread
        or destroy (``FORMAT_WAL``: a ``wal/`` object, whose data an older prune deletes; ``FORMAT_XATTRS``: a
        snapshot of version 2, whose parent an older forget removes), so that it refuses the repository.  Under
        a lock, which keeps ``config set`` out; two at once write the same.  A remote that will not rewrite the
        config (an append-only token: a database's ``archive_command``) leaves it as it is, and the write goes
        on, refusing it would stop PostgreSQL's archiving: the next push with the right to, or the next prune,
        which the token's owner runs with a full one, raises it.  Refused once, it is not asked again by this
        object (a copy of a thousand snapshots asked a thousand times)."""
        if self.config.format >= fmt or self._format_refused:
            return
        stored = self.stored_config()
        if stored.format < fmt:
            stored.format = fmt
            try:
                self.remote.put("config", stored.encode(self.sealer))
            except PermissionDenied:
                self._format_refused = True
                return
        self.config = stored

    def follow_settings(self, raw: bytes) -> None:
        """Take the settings of ``raw``, the config as a command just read it under its lock: a repository
        kept open (a service's) writes with the settings of ``config set`` from its next backup on, as one
        opened anew would.  One that does not open keeps those it has: its damage is for ``check`` and the
        next opening to report, not a reason to stop a backup that did not stop for it before."""
        try:
            self.config = self.stored_config(raw)
        except CorruptObject:
            pass

    # --- the index --------------------------------------------------------------

    @property
    def index(self) -> BlobIndex:
        if self._index is None:
            with self._index_lock:  # restore's fetch threads may all ask first
                if self._index is None:
                    self.load_index()
        assert self._index is not None
        return self._index

    def locate(self, blob_id: bytes) -> BlobLocation | None:
        """Where a blob is; safe while a writer adds to the index from another thread."""
        index = self.index
        with self._index_lock:
            return index.get(blob_id)

    def pack_no(self, pack_id: bytes | None) -> int:
        with self._lock:
            if pack_id is not None and pack_id in self._pack_nos:
                return self._pack_nos[pack_id]
            self.pack_ids.append(pack_id)
            n = len(self.pack_ids) - 1
            if pack_id is not None:
                self._pack_nos[pack_id] = n
            return n

    def set_pack_id(self, pack_no: int, pack_id: bytes) -> None:
        with self._lock:
            self.pack_ids[pack_no] = pack_id
            self._pack_nos.setdefault(pack_id, pack_no)

    def _index_bytes(self, name: str, fresh: bool = False) -> bytes:
        key = f"index/{name}"
        data = (self.remote.uncached() if fresh else self.remote).get(key)
        if content_name(data) != name and not fresh:  # a local copy that is not it: the stored one decides
            self.remote.drop_cached(key)
            data = self.remote.get(key)
        if content_name(data) != name:
            raise CorruptObject(key, "content does not match its name")
        return data

    def read_index_object(self, name: str) -> IndexData:
        return self._index_object(name, decode_index)

    def read_index_columns(self, name: str, fresh: bool = False) -> IndexColumns:
        """An index object, its entries left in its bytes (each delta's base among them)."""
        return self._index_object(name, decode_index_columns, fresh)

    def _index_object(self, name: str, decode: Callable[[Sealer, bytes, str], IndexT],
                      fresh: bool = False) -> IndexT:
        try:
            return decode(self.sealer, self._index_bytes(name, fresh), f"index/{name}")
        except NewerObject:  # not damage: nothing to repair, an upgrade reads it
            raise
        except CorruptObject as exc:
            raise exc.explained("; `repair index` rebuilds the index from the packs") from None

    def unindexed_packs(self, stored: dict[bytes, int] | None = None) -> dict[bytes, int]:
        """The stored packs (``stored``, else listed now) that the loaded index lists nothing of: another
        backup's in flight, or packs whose index objects were lost."""
        stored = self.stored_packs() if stored is None else stored
        indexed = set(self.pack_ids)
        return {pid: size for pid, size in stored.items() if pid not in indexed}

    def pack_header(self, key: str, size: int) -> list[PackEntry]:
        """The entries a stored pack's own header lists (its trailer and sealed header, two ranged reads);
        CorruptObject (or ValueError) where they do not read."""
        return fetch_header(self.sealer, lambda offset, length: self.remote.get(key, offset, length), size,
                            key).entries

    def stored_packs(self) -> dict[bytes, int]:
        """Pack id -> size of every pack stored under data/ (objects not named by a pack id, or not where a
        pack of that name is kept, left out: ``pack_id_of``)."""
        return {pid: o.size for o in self.remote.list("data/") if (pid := pack_id_of(o.key)) is not None}

    def index_names(self, strays: list[str] | None = None) -> list[str]:
        """Every index object's name; objects not named as one (another repository nested below, a stray
        file, an object an append-only client planted) are left out, as ``stored_packs`` leaves them:
        reported as damaged index objects, they stopped every backup, and `repair index` with them.  Their
        keys go to ``strays``, when given (``check`` names them)."""
        return [name for name, _ in self._named_objects("index/", strays)]

    def _named_objects(self, prefix: str, strays: list[str] | None = None) -> Iterator[tuple[str, ObjectInfo]]:
        """The objects under ``prefix`` named as a pack, an index object or a snapshot is (``OBJECT_ID``), with
        their names; the keys of the others go to ``strays``, when given."""
        for o in self.remote.list(prefix):
            if OBJECT_ID.fullmatch(name := o.key.split("/", 1)[1]):
                yield name, o
            elif strays is not None:
                strays.append(o.key)

    def read_index_objects(self, names: list[str], *, fresh: bool = False
                           ) -> list[tuple[str, IndexColumns | CorruptObject | ObjectNotFound]]:
        """Each index object named, decoded, or why it cannot be: read ``OBJECT_READERS`` at a time; ``fresh``:
        the stored copies, past any local cache (``check``)."""
        def read(name: str) -> IndexColumns | CorruptObject | ObjectNotFound:
            try:
                return self.read_index_columns(name, fresh)
            except (CorruptObject, ObjectNotFound) as exc:
                return exc

        with ThreadPoolExecutor(OBJECT_READERS) as pool:
            return list(zip(names, pool.map(read, names)))

    def load_index(self) -> None:
        """Read every index object.  One that does not (damaged, or planted: a client with an append-only
        token can store any bytes under a new name) is left out with a warning, unless one that reads
        supersedes it (a repair or prune stopped before deleting it: it lists nothing live): what the others
        list still restores, and a backup stores again what only it listed.  What deletes packs by the index
        (prune, the repairs) reads the index objects itself and stops on such an object; one a newer
        chunkvault wrote stops every command (an upgrade reads it)."""
        names = self.index_names()
        read = self.read_index_objects(names)
        objects = [(name, got) for name, got in read if isinstance(got, IndexColumns)]
        superseded = superseded_names(got for _, got in objects)
        unreadable = {name: got for name, got in read if not isinstance(got, IndexColumns) and name not in superseded}
        for got in unreadable.values():
            if isinstance(got, NewerObject) or not isinstance(got, CorruptObject):  # newer, or gone since listed
                raise got
        for name, got in unreadable.items():
            self._warn_unreadable_index(name, got)
        self.install_index(names, objects)

    def _warn_unreadable_index(self, name: str, got: CorruptObject) -> None:
        if name not in self._warned_indexes:
            self._warned_indexes.add(name)
            warnings.warn(f"index/{name[:12]} does not load and is left out ({got.reason}); `check` says "
                          "what it takes down", RepositoryStateWarning, stacklevel=3)

    def install_index(self, names: list[str], objects: list[tuple[str, IndexColumns]], *,
                      beside_writers: bool = False) -> tuple[list[IndexColumns], BlobIndex]:
        """Make the index from these objects, read already (``names``: every index object listed, the
        unreadable ones too), leaving out those another supersedes; returns those it used, and the index.

        ``beside_writers`` (``check``, which may run beside a backup of this object in another thread): while
        a writer of this object fills the loaded index it is kept, the one made only returned: in its place,
        the writer's blobs not yet in an index object were lost to the reads that follow, and a restore of
        its snapshot called for `repair index` until the repository was opened again."""
        superseded = superseded_names(d for _, d in objects)
        live = [d for n, d in objects if n not in superseded]
        # Each delta's base goes with its row: those of an index before it (a prune since dropped a delta, say)
        # would make a copy of that blob stored whole later read as a delta.
        index = BlobIndex(sum(d.entry_count for d in live))
        copies: dict[bytes, list[tuple[BlobLocation, bytes | None]]] = {}
        for d in live:
            self._add_object(d, index, copies)
        with self._index_lock:
            if beside_writers and self._writers:
                return live, index
            # Published only when complete: other threads never see a half-loaded index.
            self._index, self._index_names, self._withheld = index, set(names), None
            self._copies = copies
            self._index_unsettled = False
        return live, index

    def install_packs(self, names: list[str], packs: Iterable[tuple[bytes, EncodedEntries]]) -> BlobIndex:
        """Make the index from these packs' entries, in the order given (``names``: every index object listed),
        as ``install_index`` makes it from the objects; returns it.  Its rows point at the entries where they
        lie (``BlobIndex(by_ref=True)``), which the caller holds anyway, rather than copying them.  A prune
        gives every pack the live objects list, in pack id order: of a blob stored twice, the index then reads
        the copy the prune keeps (``prune.kept_copies``), and the prune's table of those copies is this one,
        not a second table of every blob: a read that goes over to another copy of a blob (``_other_copy``)
        does so in a copy of the index, leaving this one as made."""
        # Rows point into bytes alone (another buffer is copied first): the entries are told by where they lie.
        packs = [(pid, e if type(e._buf) is bytes else EncodedEntries(bytes(e.view), 0, len(e), e.encoded_size))
                 for pid, e in packs]
        index = BlobIndex(sum(len(e) for _, e in packs), by_ref=True)
        copies: dict[bytes, list[tuple[BlobLocation, bytes | None]]] = {}
        for pack_id, entries in packs:
            self._add_pack(pack_id, entries, index, copies)
        with self._index_lock:
            self._index, self._index_names, self._withheld = index, set(names), None
            self._copies = copies
            self._index_unsettled = False
            self._lent = weakref.ref(index)
        return index

    def drop_index(self) -> None:
        """Let go of the loaded index, read again when next needed; kept while a writer of this object fills
        it (its blobs not yet in an index object would be lost).  A prune seals its new index without the
        old one beside it."""
        with self._index_lock:
            if not self._writers:
                self._index, self._copies, self._withheld = None, {}, None

    def kept_instead(self, entries: Iterable[PackEntry], table: BlobIndex) -> None:
        """``table`` (the index ``install_packs`` returned) now points at these copies of their blobs (a
        prune's, whose first copy did not verify): reads take each one's base, or none, with it (from the entry
        each row points at).  Where a read went over to another copy meanwhile, the index is a copy of
        ``table`` (``_other_copy``) and may hold yet another copy of such a blob: it is pointed where ``table``
        is, with its base, else it read that copy with the base of this one and called a good blob damaged."""
        with self._index_lock:
            index = self._index
            if index is None or index is table:
                return
            for e in entries:
                kept, held = table.get(e.blob_id), index.get(e.blob_id)
                if kept is None or held is None:
                    continue
                base = e.base_id if e.kind == KIND_DELTA else None
                if held != kept:
                    copies = self._copies.setdefault(e.blob_id, [])
                    copies[:] = [c for c in copies if c[0] != kept] + [(held, index.base_of(e.blob_id))]
                    index.replace(e.blob_id, kept, base)
                elif index.base_of(e.blob_id) != base:  # two entries at one place: the one kept names the base
                    index.replace(e.blob_id, kept, base)

    def withhold_unreadable_deltas(self) -> set[bytes]:
        """Leave out of the index the deltas whose chain of bases it does not hold (``unreadable_deltas``),
        before anything deduplicates against it: a backup then stores such a chunk again, and reads again a
        file whose data is among them.  The other readers keep them, to name both ids when one is read.
        Costs one native pass over the rows, a lookup a delta's base; returns the ids left out."""
        with self._index_lock:
            index = self.index
            if self._withheld is not None:
                return set(self._withheld)
            withheld = index.unreadable_deltas()
            if withheld:
                self._index = index.copy(without=b"".join(withheld))
            self._withheld = {b: index.base_of(b) for b in withheld}
            return withheld

    def _add_object(self, d: IndexColumns, index: BlobIndex,
                    copies: dict[bytes, list[tuple[BlobLocation, bytes | None]]]) -> None:
        """Add one index object's entries to ``index`` (each delta's base with its row), and to ``copies`` the
        other copies of blobs stored more than once (``_note_copies``)."""
        replaced: list[tuple[bytes, BlobLocation, bytes | None]] = []  # deltas a copy stored whole took the place of
        rows = len(index)
        added = sum(index.add_entries(d.plain, start, count, self.pack_no(pack_id), replaced)
                    for pack_id, count, start in zip(d.pack_ids, d.counts, d.starts))
        if added == d.entry_count:  # every blob new, once each (the usual case): each copy is the one held
            return
        self._note_copies(replaced, [(self.pack_no(pid), entries) for pid, entries in d.packs()], index, rows,
                          copies)

    def _add_pack(self, pack_id: bytes, entries: EncodedEntries, index: BlobIndex,
                  copies: dict[bytes, list[tuple[BlobLocation, bytes | None]]]) -> None:
        """``_add_object`` for one pack's entries, into an index whose rows point at them (``by_ref``)."""
        replaced: list[tuple[bytes, BlobLocation, bytes | None]] = []
        pack_no = self.pack_no(pack_id)
        rows = len(index)
        if index.add_entries(entries._buf, entries._start, len(entries), pack_no, replaced) != len(entries):
            self._note_copies(replaced, [(pack_no, entries)], index, rows, copies)

    @staticmethod
    def _note_copies(replaced: list[tuple[bytes, BlobLocation, bytes | None]], packs: list[tuple[int, EncodedEntries]],
                     index: BlobIndex, rows: int, copies: dict[bytes, list[tuple[BlobLocation, bytes | None]]]
                     ) -> None:
        """Of packs just added to ``index`` (which had ``rows`` rows before them) where some blob was there
        already: the other copies, each with its base.

        Of a blob stored twice (after two backups at once, or a copy) the index keeps one copy: a whole one
        before a delta, else the first.  Its base, or none, is that copy's, kept with its row: a base of
        another copy, which may be lost, makes a read call the blob damaged.  The copies may lie in one object
        (prune's and repair's compact index lists every kept pack), even in one pack (as only a made-up index
        has them), so the held copy's entry is told from the others by where it lies (``by_ref``), else by
        its offset, kind and base."""
        for blob_id, loc, base in replaced:
            if index.row(blob_id) < rows:  # held until now, from an object before (else listed below)
                copies.setdefault(blob_id, []).append((loc, base))
        for pack_no, entries in packs:
            pos = entries._start
            for e in entries.decode():
                at, pos = pos, pos + entry_bytes(e.kind)
                loc = index.get(e.blob_id)
                if loc is None:
                    continue
                held = loc.pack_no == pack_no and (
                    index.entry_pos(e.blob_id, entries._buf) == at if index.by_ref else
                    (loc.offset, loc.flags, index.base_of(e.blob_id)) == (e.offset, e.kind, e.base_id))
                if not held:  # another copy is kept, with its base
                    copies.setdefault(e.blob_id, []).append(
                        (BlobLocation(pack_no, e.offset, e.length, e.raw_length, e.kind), e.base_id))

    def _base_of(self, blob_id: bytes) -> bytes | None:
        """The base the index's row of a delta keeps (that of a delta withheld from it, ``_withheld``, too);
        None while no index is loaded."""
        index = self._index
        if index is None:
            return None
        base = index.base_of(blob_id)
        if base is None and self._withheld and blob_id not in index:  # (one stored whole again is read so)
            return self._withheld.get(blob_id)
        return base

    def delta_chain(self, blob_id: bytes) -> list[bytes]:
        """The bases below a blob per the index, nearest first (stops past the depth bound)."""
        index = self._index
        if index is None:
            return []
        if not self._withheld:  # (the usual case: one native call)
            return index.chain(blob_id, self.max_delta_depth + 1)
        out: list[bytes] = []
        cur = self._base_of(blob_id)
        while cur is not None and len(out) <= self.max_delta_depth:
            out.append(cur)
            cur = self._base_of(cur)
        return out

    def delta_base(self, blob_id: bytes) -> bytes | None:
        """The base of a delta blob per the index (None for a whole blob, or one not indexed; one withheld from
        a writer's index keeps its base here)."""
        return self._base_of(blob_id)

    def delta_depth(self, blob_id: bytes) -> int:
        """How many deltas in a row a read of this blob decodes (0 for a whole blob)."""
        index = self._index
        if index is not None and not self._withheld:  # (``check`` asks it of every delta)
            return index.depth(blob_id, self.max_delta_depth + 1)
        return len(self.delta_chain(blob_id))

    def base_for(self, blob_id: bytes, bound: int = MAX_DELTA_DEPTH, turn: bool = False) -> bytes:
        """The base for a delta replacing ``blob_id`` (``deltabase.choose_base``): that blob, or the whole
        blob its chain starts from at the chunk's ``turn`` or at ``bound``, so chains restart and never grow
        past ``bound`` (nor past the bound reads accept)."""
        chain = [blob_id, *self.delta_chain(blob_id)]
        return chain[choose_base(chain, min(bound, self.max_delta_depth), turn)]

    def write_index(self, d: IndexData, *, naming: Callable[[str], None] | None = None) -> str:
        """Store an index object; its name.  ``naming`` is told the name before the upload: a caller that may
        take the object back must know it also when the upload fails after it landed (a lost reply)."""
        data = encode_index(self.sealer, d)
        name = content_name(data)
        if naming is not None:
            naming(name)
        try:
            self.remote.put(f"index/{name}", data, if_absent=True)
        except ObjectExists:
            pass
        self._index_names.add(name)
        return name

    # --- reading blobs ------------------------------------------------------------

    def read_envelope(self, blob_id: bytes) -> tuple[bytes, int]:
        loc = self.locate(blob_id)
        if loc is None:
            raise MissingObject(f"blob {blob_id.hex()}", NOT_INDEXED)
        return self._read_at(blob_id, loc)

    def _read_at(self, blob_id: bytes, loc: BlobLocation) -> tuple[bytes, int]:
        """(envelope, raw length) of the copy of a blob at ``loc``."""
        pack_id = self.pack_ids[loc.pack_no]
        if pack_id is None:
            raise MissingObject(f"blob {blob_id.hex()}", "its pack is not stored yet")
        key = pack_key(pack_id)
        try:
            env = self.remote.get(key, loc.offset, loc.length)
        except ObjectNotFound:
            raise _lost_pack(key, blob_id) from None
        if len(env) != loc.length:
            raise CorruptObject(key, f"truncated: blob {blob_id.hex()} lies past its end")
        return env, loc.raw_length

    def read_blob(self, blob_id: bytes, *, verify: bool = False, cache: bool = False) -> Plaintext:
        """Plaintext of a blob; a delta's chain of bases is read on the way (at most ``max_delta_depth``)."""
        cached = self._cache.get(blob_id)
        if cached is not None:
            return cached
        data = self._decode(blob_id)
        if verify:
            self.check_id(blob_id, data)
        if cache:
            self._cache.put(blob_id, data)
        return data

    def _decode(self, blob_id: bytes) -> Plaintext:
        """A blob read off the remote and decoded (its delta chain too), past the blob cache."""
        return self._resolve(blob_id, self._chain_ahead([blob_id]), {}, set())

    def check_id(self, blob_id: bytes, plain: Plaintext) -> None:
        """CorruptObject unless ``plain`` hashes to ``blob_id`` (what the AEAD cannot tell: a writer's bug)."""
        if self.blob_id(plain) != blob_id:
            raise CorruptObject(f"blob {blob_id.hex()}", "content does not hash to its id")

    def _known(self, blob_id: bytes, memo: dict[bytes, Plaintext]) -> tuple[Plaintext, int] | None:
        """(plaintext, delta depth) of a blob already decoded in this call or cached."""
        plain = memo.get(blob_id)
        if plain is None:
            plain = self._cache.peek(blob_id)
        return None if plain is None else (plain, self.delta_depth(blob_id))

    def _walk_chain(self, blob_id: bytes, envs: dict[bytes, tuple[bytes, int]],
                    memo: dict[bytes, Plaintext]) -> tuple[list[tuple[bytes, bytes, int]], Plaintext | None]:
        """Envelopes from ``blob_id`` down its chain of bases (top first), and the plaintext below them.

        The walk stops at a whole blob (nothing below) or at a plaintext already
        known; a chain of more than ``max_delta_depth`` deltas is refused.
        """
        chain: list[tuple[bytes, bytes, int]] = []
        cur = blob_id
        while True:
            known = self._known(cur, memo) if chain else None
            if known is not None:
                self._check_depth(blob_id, chain, known[1])
                return chain, known[0]
            try:
                env, raw_length = envs[cur] if cur in envs else self.read_envelope(cur)
            except CorruptObject as exc:
                if not chain:
                    raise
                raise CorruptObject(f"blob {blob_id.hex()}", f"its delta base {cur.hex()} is unreadable: "
                                                             f"{exc.object_name}: {exc.reason}") from None
            chain.append((cur, env, raw_length))
            base = envelope_base(env)
            indexed = self._base_of(cur)
            # The envelope's header, not yet authenticated: a delta's names its base, and one over a blob the
            # index has whole (its base that blob itself, say) would be followed down a chain no one wrote.
            if base != indexed and (indexed is not None or self.locate(cur) is not None):
                what = f"blob {cur.hex()}" if cur == blob_id else f"its delta base {cur.hex()}"
                raise CorruptObject(f"blob {blob_id.hex()}", f"{what} is damaged: its envelope names the base "
                                    f"{base.hex() if base else '(none)'}, the index "
                                    f"{indexed.hex() if indexed else '(none: stored whole)'}")
            if base is None:
                return chain, None
            self._check_depth(blob_id, chain, 0)
            cur = base

    def _chain_wanted(self, blob_ids: Iterable[bytes]) -> list[bytes]:
        """The blobs a read of ``blob_ids`` fetches, as the index has their delta chains: each, then its bases
        down to a whole blob or to one whose plaintext is cached."""
        wanted: dict[bytes, None] = {}
        for blob_id in blob_ids:
            for cur in (blob_id, *self.delta_chain(blob_id)):
                if cur in wanted or cur in self._cache.items:
                    break
                wanted[cur] = None
        return list(wanted)

    def _chain_ahead(self, blob_ids: list[bytes]) -> dict[bytes, tuple[bytes, int]]:
        """The envelopes of the delta chains of ``blob_ids`` as the index has them, fetched together (packs in
        parallel), or {} for whole blobs: a walk down a chain read each base once the envelope above it had
        come, a round trip per level in a row.  The walk still checks each envelope's base against the index;
        where this read fails, it reads blob by blob, naming the problem exactly."""
        wanted = self._chain_wanted(blob_ids)
        if len(wanted) <= len(blob_ids):
            return {}
        try:
            return self._fetch_envelopes(wanted)
        except (CorruptObject, MissingObject):
            return {}

    def _check_depth(self, blob_id: bytes, chain: list[tuple[bytes, bytes, int]], below: int) -> None:
        if len(chain) + below > self.max_delta_depth:
            path = " -> ".join(c[0].hex() for c in chain)
            raise CorruptObject(f"blob {blob_id.hex()}", f"its delta chain is longer than {self.max_delta_depth} "
                                                         f"(through {path})")

    def _resolve(self, blob_id: bytes, envs: dict[bytes, tuple[bytes, int]], memo: dict[bytes, Plaintext],
                 shared: set[bytes]) -> Plaintext:
        """Decode one blob, its bases first; a base that fails is an error naming both ids.  Where the copy
        of the blob or of a base that was read fails and another copy of it reads (``_other_copy``), the
        blob is decoded again from there.

        Decoded bases in ``shared`` (needed again in this call) are kept in ``memo``.
        """
        tries = 0
        read_again = False
        garbled: int | None = None  # the copy switches when the read that failed was made again
        while True:
            switches = self._copy_switches
            try:
                plain = self._resolve_once(blob_id, envs, memo, shared)
                if garbled == self._copy_switches:  # not where another copy read: that one's failed as stored
                    warnings.warn(f"blob {blob_id.hex()} (or a delta base of it) did not authenticate as first read, "
                                  "and did when read again: garbled on the way from the storage", RemoteRetryWarning,
                                  stacklevel=2)
                return plain
            except CorruptObject as exc:
                if not read_again and not isinstance(exc, (MissingObject, NewerObject)):
                    # A ranged read comes with no checksum of its own (S3's is the whole object's), so bytes
                    # garbled on the way show here first: read once more before calling the stored ones damaged.
                    read_again, garbled, envs = True, switches, {}
                    continue
                garbled = None
                if not self._copies or tries == COPY_TRIES:  # a remote that fails now and then: not for ever
                    raise
                envs = {}  # what was fetched may be the failed copy's
                if switches == self._copy_switches and not any(
                        self._other_copy(b) for b in (blob_id, *self.delta_chain(blob_id)) if b in self._copies):
                    raise
                tries += 1

    def stored_twice(self, blob_id: bytes) -> bool:
        """Whether the index knows another copy of ``blob_id`` than the one it points at."""
        return blob_id in self._copies

    def _other_copy(self, blob_id: bytes) -> bool:
        """After a read involving ``blob_id`` failed: whether the index now points at another copy of it, one
        whose envelope authenticates, because the copy it pointed at does not (a warning says so, naming
        both packs).  False where the copy held reads, or no other does."""
        held = self.locate(blob_id)
        if held is None:  # withheld from the index (``withhold_unreadable_deltas``): a writer stores it again
            return False
        try:
            open_envelope(self.sealer, blob_id, self._read_at(blob_id, held)[0])
            return False
        except CorruptObject as exc:
            failure = exc
        for other in list(self._copies.get(blob_id, ())):
            loc, base = other
            try:
                open_envelope(self.sealer, blob_id, self._read_at(blob_id, loc)[0])
            except CorruptObject:
                continue
            with self._index_lock:
                copies = self._copies.get(blob_id)
                if self.index.get(blob_id) != held or copies is None or other not in copies:
                    return True  # another thread went over first, or the index was read anew: read again
                copies.remove(other)
                copies.append((held, self.index.base_of(blob_id)))
                if self._lent is not None and self._lent() is self._index:
                    self._index, self._lent = self._index.copy(), None
                self.index.replace(blob_id, loc, base)
                self._copy_switches += 1
            warnings.warn(f"blob {blob_id.hex()} is read from its copy in pack {self._pack_name(loc)}: the copy "
                          f"in pack {self._pack_name(held)} is unreadable ({failure}); `check --read-data` "
                          "names what else it holds", RepositoryStateWarning, stacklevel=2)
            return True
        return False

    def _pack_name(self, loc: BlobLocation) -> str:
        pack_id = self.pack_ids[loc.pack_no]
        return "(not stored yet)" if pack_id is None else pack_id.hex()

    def _resolve_once(self, blob_id: bytes, envs: dict[bytes, tuple[bytes, int]], memo: dict[bytes, Plaintext],
                      shared: set[bytes]) -> Plaintext:
        chain, plain = self._walk_chain(blob_id, envs, memo)
        for cut in sorted((i for i in range(1, len(chain)) if chain[i][0] in shared), reverse=True):
            plain = memo[chain[cut][0]] = self._open_chain(blob_id, chain[cut:], plain)
            chain = chain[:cut]
        return self._open_chain(blob_id, chain, plain)

    def _open_chain(self, blob_id: bytes, chain: list[tuple[bytes, bytes, int]],
                    plain: Plaintext | None) -> Plaintext:
        try:
            return open_chain(self.sealer, chain, plain)
        except CorruptObject as exc:
            name = f"blob {blob_id.hex()}"
            failed = exc.object_name.split()[-1]
            where = self._stored_in(failed)
            if exc.object_name == name:
                raise exc.explained(where) from None
            raise CorruptObject(name, f"its delta base {failed} is corrupt: {exc.reason}{where}") from None

    def _stored_in(self, blob_hex: str) -> str:
        """The object a blob was read from, as its damage names it (`` (read from data/..)``): the pack to put
        back (from a bucket's old versions, say), not the blob alone."""
        try:
            loc = self.locate(bytes.fromhex(blob_hex))
        except ValueError:
            return ""
        pack_id = None if loc is None else self.pack_ids[loc.pack_no]
        return "" if pack_id is None else f" (read from {pack_key(pack_id)})"

    def read_blobs(self, blob_ids: list[bytes], *, cache: bool = False) -> list[Plaintext]:
        """Plaintexts of several blobs, in order.

        Envelopes are fetched level by level down the delta chains (the blobs,
        then their bases, ...), neighbours in a pack with one ranged get; every
        base is decoded once per call.  ``cache``: each kept in the blob cache
        too (read ahead, for a step that comes later).
        """
        envs: dict[bytes, tuple[bytes, int]] = {}
        uses = Counter(blob_ids)
        level = [b for b in uses if b not in self._cache.items]
        walked = set(level)  # the blobs whose bases are counted: fetched is not walked (the chains come first)
        try:
            envs.update(self._fetch_envelopes(self._chain_wanted(level)))  # every level at once, as indexed
            for _ in range(self.max_delta_depth + 1):
                if not level:
                    break
                envs.update(self._fetch_envelopes([b for b in level if b not in envs]))
                bases = [base for b in level if (base := envelope_base(envs[b][0])) is not None]
                uses.update(bases)
                level = [b for b in dict.fromkeys(bases) if b not in walked and b not in self._cache.items]
                walked.update(level)
        except CorruptObject:
            envs = {}  # the single-blob path names any problem exactly
        shared = {b for b, n in uses.items() if n > 1}
        memo: dict[bytes, Plaintext] = {}
        out = []
        for bid in blob_ids:
            plain = self._cache.get(bid)
            if plain is None:
                plain = memo[bid] if bid in memo else self._resolve(bid, envs, memo, shared)
                if bid in shared:
                    memo[bid] = plain
            out.append(plain)
            if cache:
                self._cache.put(bid, plain)
        return out

    def uncache(self, blob_ids: Iterable[bytes]) -> None:
        """Drop ``blob_ids`` from the blob cache: read ahead for one step (``read_blobs(cache=True)``), they
        would otherwise stay there once it is done, up to the cache's bounds."""
        self._cache.drop(blob_ids)

    def _fetch_envelopes(self, blob_ids: list[bytes]) -> dict[bytes, tuple[bytes, int]]:
        """(envelope, raw length) of each blob; neighbours in a pack (``_read_gap`` apart at most) come with
        one ranged get."""
        out: dict[bytes, tuple[bytes, int]] = {}
        spans: dict[bytes, list[tuple[int, int, bytes, int]]] = {}  # pack id -> (offset, length, id, raw length)
        for bid in blob_ids:
            loc = self.locate(bid)
            pack_id = self.pack_ids[loc.pack_no] if loc is not None else None
            if loc is None or pack_id is None:
                out[bid] = self.read_envelope(bid)  # raises, naming the blob
                continue
            if self._recent is not None:
                env = self._recent.find(pack_key(pack_id), loc.offset, loc.length)
                if env is not None:
                    out[bid] = (env, loc.raw_length)
                    continue
            spans.setdefault(pack_id, []).append((loc.offset, loc.length, bid, loc.raw_length))
        runs: list[_Run] = []
        for pack_id, items in spans.items():
            items.sort()
            j = 0
            while j < len(items):
                start = items[j][0]
                end = items[j][0] + items[j][1]
                k = j + 1
                while k < len(items) and items[k][0] <= end + self._read_gap:
                    end = max(end, items[k][0] + items[k][1])
                    k += 1
                runs.append((pack_key(pack_id), start, end, items[j:k]))
                j = k
        for (key, start, _, items), data in zip(runs, self._read_runs(runs)):
            for offset, length, bid, raw_length in items:
                env = data[offset - start : offset - start + length]
                if len(env) != length:
                    raise CorruptObject(key, f"truncated: blob {bid.hex()} lies past its end")
                out[bid] = (env, raw_length)
        return out

    def _read_runs(self, runs: list["_Run"]) -> Iterator[bytes]:
        """The bytes of each (key, start, end, items) run, in order; off local disk ``OBJECT_READERS`` at a
        time (each waits a round trip)."""
        def read(run: _Run) -> bytes:
            key, start, end, items = run
            try:
                data = self.remote.get(key, start, end - start)
            except ObjectNotFound:
                raise _lost_pack(key, items[0][2]) from None
            if self._recent is not None:
                self._recent.add(key, start, data)
            return data

        if len(runs) < 2 or self.remote.cheap_ranges:
            return map(read, runs)
        return parallel_map(read, runs, workers=min(OBJECT_READERS, len(runs)))

    # --- writing blobs --------------------------------------------------------------

    def prepare_blob(self, blob_id: bytes, data: bytes | memoryview, *, base_id: bytes | None = None,
                     base_plain: Plaintext | None = None, delta_margin: float = 0.0,
                     level: int | None = None) -> PreparedBlob:
        """Compress and seal one blob (thread-safe, releases the GIL in native code).

        A delta is kept when it is smaller than plain compression by ``delta_margin``.
        Plain compression is skipped when the delta is under SKIP_PLAIN_SHARE of what
        the whole blob below the base takes, scaled to this blob's length, or under
        SKIP_SAMPLED_SHARE of what a sample of this blob compresses to, scaled: it could
        not win.  ``level``: zstd's, for this blob (default: the repository's).
        """
        if level is None:
            level = self.config.settings.compression_level
        if base_id is not None and base_plain is not None:
            d = delta_compress(data, base_plain, max(level, 1))
            kept = 1.0 - delta_margin
            estimate = self._stored_estimate(base_id, len(data))
            if estimate is not None and len(d) + 32 < estimate * SKIP_PLAIN_SHARE * kept:
                return self._sealed_delta(blob_id, d, len(data), base_id)
            sampled = sampled_size(data, level)
            if sampled is not None and len(d) + 32 < sampled * SKIP_SAMPLED_SHARE * kept:
                return self._sealed_delta(blob_id, d, len(data), base_id)
            kind, payload = compress(data, level)
            if len(d) + 32 < len(payload) * kept:
                return self._sealed_delta(blob_id, d, len(data), base_id)
        else:
            kind, payload = compress(data, level)
        return self._sealed_whole(blob_id, kind, payload, len(data))

    def prepare_blobs(self, batch: list[tuple[bytes, bytes | memoryview, bytes | None]],
                      bases: dict[bytes, Plaintext], delta_margin: float = 0.0,
                      level: int | None = None) -> list[PreparedBlob]:
        """``prepare_blob`` for (blob id, data, base id or None) each, base plaintexts from ``bases``; the
        blobs without a base are compressed in one native call (``compress_many``)."""
        plain = [i for i, (_, _, b) in enumerate(batch) if b is None or bases.get(b) is None]
        if level is None:
            level = self.config.settings.compression_level
        compressed = compress_many([batch[i][1] for i in plain], level)
        envelopes = seal_whole_blobs(self.sealer, [(batch[i][0], kind, payload)
                                                   for i, (kind, payload) in zip(plain, compressed)])
        whole = {i: PreparedBlob(batch[i][0], kind, envelope, len(batch[i][1]), None)
                 for i, (kind, _), envelope in zip(plain, compressed, envelopes)}
        return [whole[i] if i in whole else self.prepare_blob(blob_id, data, base_id=base_id,
                                                              base_plain=bases[base_id], delta_margin=delta_margin,
                                                              level=level)
                for i, (blob_id, data, base_id) in enumerate(batch)]

    def _sealed_whole(self, blob_id: bytes, kind: int, payload: bytes, raw_length: int) -> PreparedBlob:
        return PreparedBlob(blob_id, kind, seal_blob(self.sealer, blob_id, kind, payload), raw_length, None)

    def _sealed_delta(self, blob_id: bytes, payload: bytes, raw_length: int, base_id: bytes) -> PreparedBlob:
        return PreparedBlob(blob_id, KIND_DELTA, seal_blob(self.sealer, blob_id, KIND_DELTA, payload, base_id),
                            raw_length, base_id)

    def _stored_estimate(self, base_id: bytes, length: int) -> int | None:
        """Envelope bytes the whole blob below ``base_id`` takes, scaled to ``length`` plaintext bytes."""
        chain = self.delta_chain(base_id)
        loc = self.locate(chain[-1] if chain else base_id)
        if loc is None or not loc.raw_length or loc.flags == KIND_DELTA:
            return None
        return loc.length * length // loc.raw_length

    def writer(self) -> "BlobWriter":
        return BlobWriter(self)

    def read_sealed(self, key: str, decode: Callable[[bytes], T], *, fresh: bool = False) -> tuple[T, bytes]:
        """``decode`` of the object ``key`` (a sealed document that may be cached locally), and its bytes.
        A local copy that does not open (another object's, planted) is dropped and the stored one decoded;
        ``fresh``: the stored one only.  ObjectNotFound passes through."""
        data = (self.remote.uncached() if fresh else self.remote).get(key)
        try:
            return decode(data), data
        except NewerObject:  # authentic (read past the AEAD): no copy of it reads otherwise
            raise
        except CorruptObject:
            if fresh:
                raise
            self.remote.drop_cached(key)
            data = self.remote.get(key)
            return decode(data), data

    # --- snapshots --------------------------------------------------------------------

    def load_snapshot(self, name: str, fresh: bool = False) -> Snapshot:
        """``fresh``: the stored copy, read again (``check``: a copy cached, or loaded before, hides damage
        done to it since, which no listing's version shows)."""
        snap = None if fresh else self._snapshots.get(name)
        if snap is not None:
            return snap
        key = f"snapshots/{name}"
        try:
            snap, data = self.read_sealed(key, lambda d: Snapshot.decode(self.sealer, name, d), fresh=fresh)
        except ObjectNotFound:
            raise MissingObject(key) from None
        self._snapshots[name] = snap
        self._snapshot_seen[name] = (len(data), None)
        self.snapshot_digests[name] = content_name(data)[:32]
        return snap

    def snapshot_names(self, strays: list[str] | None = None) -> list[str]:
        """Every snapshot object's name; objects not named as one (a snapshot id is 64 lowercase hex digits:
        a desktop's ``desktop.ini``, a name whoever holds the storage made up) are left out, as
        ``index_names`` leaves them: taken for damaged snapshots, they stopped every prune and retention.
        Their keys go to ``strays``, when given (``check`` names them)."""
        return [name for name, _ in self._named_objects("snapshots/", strays)]

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot that loads, oldest first.  One that does not (damaged, or written with another
        key) is left out and kept in ``unreadable_snapshots`` (name -> error), for the caller to report,
        or to refuse on with ``require_readable`` where it must see every snapshot; one deleted since
        the listing is simply gone.  A loaded index is then brought up to date (``refresh_index``), so that
        it holds the blobs of every snapshot listed."""
        known = list(self._snapshot_seen)  # before the listing: a snapshot saved after it is not listed
        era = self._listing_era  # a lock taken meanwhile (by another thread) outdates this listing
        listed = {name: (o.size, o.version) for name, o in self._named_objects("snapshots/")}
        names = list(listed)
        for name in known:
            if name not in listed:  # forgotten since: an object kept open for months holds only what is there
                self._forget_snapshot(name)
        for name, seen in listed.items():  # rewritten meanwhile by another command (a rebase, a tag, a rewrite)
            if self._snapshot_seen.get(name, seen) != seen or seen[1] is None:  # no version: read again
                self._snapshots.pop(name, None)

        def load(name: str) -> Snapshot | CorruptObject | None:
            seen = listed[name]
            try:
                fresh = name not in self._snapshots
                snap = self.load_snapshot(name)
                if fresh and self._snapshot_seen.get(name, (None,))[0] == seen[0]:  # read as listed: else
                    self._snapshot_seen[name] = seen  # the next listing reads it again
                    if seen[1] is not None:
                        self._decoded[name] = (seen, snap.copy())  # type: ignore[assignment]
                return snap
            except MissingObject:
                return None
            except CorruptObject as exc:
                return exc

        for name, seen in listed.items():
            decoded = self._decoded.get(name)
            if name not in self._snapshots and decoded is not None and decoded[0] == seen:
                self._snapshots[name] = decoded[1].copy()
                self._snapshot_seen[name] = seen
        # A few dozen tasks, not one per snapshot: for a year of hourly snapshots on local disk, handing
        # each small read to the pool cost more than the reads.
        unread = [name for name in names if name not in self._snapshots]
        per_task = max(1, len(unread) // 64)
        batches = [unread[i:i + per_task] for i in range(0, len(unread), per_task)]
        # Off local disk, every connection of the pool: with no local cache, a listing of 2,000 snapshots
        # through 8 of them waited out some 270 round trips in a row.
        with ThreadPoolExecutor(OBJECT_READERS if self.remote.cheap_ranges else SNAPSHOT_READERS) as pool:
            read = dict(zip(unread, (x for batch in pool.map(lambda b: [load(n) for n in b], batches) for x in batch)))
        loaded = [read[name] if name in read else load(name) for name in names]
        self.unreadable_snapshots = {n: x for n, x in zip(names, loaded) if isinstance(x, CorruptObject)}
        snapshots = [x for x in loaded if isinstance(x, Snapshot)]
        # A backup stores its index objects before its snapshot: an index loaded before this listing may
        # lack what a snapshot listed here needs (another backup finished meanwhile), one listed after it not.
        self.refresh_index()
        ordered = sorted(snapshots, key=chronological_key(snapshots))
        if era == self._listing_era:
            self._listing = {s.id: s for s in ordered}
        return ordered

    def kept_listing(self) -> dict[str, Snapshot] | None:
        """The last listing (id -> snapshot) while a lock this process holds keeps each snapshot in it as it
        is: no forget, tag, rewrite or aggregate runs meanwhile, so a chain found in it is the chain.  A
        restore or diff looked every snapshot up again for each chain it followed: over HTTP, a year of hourly
        snapshots was 14 listings of 17,000 objects for one restore.  None when no such lock is held, or
        this process stored or removed a snapshot since."""
        listing = self._listing
        return listing if listing is not None and self.listing_kept() else None

    def drop_stale(self, *, index: bool = True) -> None:
        """Forget what another command may have changed before this one took its lock: the snapshot
        objects read (forget rebases differentials) and, with ``index``, the index if its objects are no
        longer the ones it was loaded from (prune and the repairs replace them; read again when needed)."""
        self._snapshots.clear()
        self._listing = None
        self._listing_era += 1
        if index:
            self.refresh_index()

    def index_replaced(self) -> bool:
        """Whether the loaded index's objects are no longer those listed now (another command's backup added
        one, a prune or repair replaced them); False while none is loaded."""
        return self._index is not None and set(self.index_names()) != self._index_names

    def refresh_index(self) -> bool:
        """Bring a loaded index up to the index objects stored now.  Objects only added since (other commands'
        backups) are read and added to it: a service that keeps a repository open for months reads each
        backup's index objects once, not the whole index after every backup.  Objects gone or replaced (a
        prune, a repair) drop it, to be read again when next needed; but never while a writer of this
        object fills it (its blobs not yet in an index object would be lost to the reads that follow):
        then the next refresh does.  The listing and the reads hold no lock: a slow listing stalls no lookup.
        True where this call dropped it: a blob a read looked up before may lie elsewhere now (repacked)."""
        with self._index_lock:
            if self._index is not None and self._index_unsettled and not self._writers:
                self._index, self._index_unsettled = None, False
                return True
            if self._index is None:
                return False
            known = set(self._index_names)
        listed = set(self.index_names())
        gone = known - listed
        read = [] if gone else self.read_index_objects(sorted(listed - known))
        with self._index_lock:
            if self._index is None or (not gone and self._add_index_objects(read)):
                return False
            if not self._writers:
                self._index = None
                return True
            return False

    def _add_index_objects(self, read: list[tuple[str, IndexColumns | CorruptObject | ObjectNotFound]]) -> bool:
        """Add index objects read since the index was loaded (under ``_index_lock``); False where the whole
        index must be read again instead: one supersedes others (a prune or repair), is gone since it was
        listed or written by a newer chunkvault, or deltas were left out of the index for want of a base,
        which an object added may bring."""
        assert self._index is not None
        read = [(name, got) for name, got in read if name not in self._index_names]  # not written here meanwhile
        if self._withheld or superseded_names(got for _, got in read if isinstance(got, IndexColumns)):
            return False
        for name, got in read:
            if isinstance(got, NewerObject) or not isinstance(got, (IndexColumns, CorruptObject)):
                return False
        for name, got in read:
            if isinstance(got, IndexColumns):
                self._add_object(got, self._index, self._copies)
            else:
                self._warn_unreadable_index(name, got)
        self._index_names.update(name for name, _ in read)
        self._withheld = None  # the deltas added: looked at again before a writer dedups against them
        return True

    def fresh_index(self) -> BlobIndex:
        """The index as stored now (for a command that holds a lock no prune shares): read if none is
        loaded, else brought up to date (``refresh_index``)."""
        self.refresh_index()
        return self.index

    def reload_snapshots(self) -> list[Snapshot]:
        """``snapshots()`` with none of the snapshot objects held taken as they are (one edited here and not
        stored): under the exclusive lock, the view that no other command's rebase can make stale before this
        one rewrites a snapshot.  A snapshot listed at the version it was decoded from is copied, not read
        again: every rewrite changes the version (``_decoded``)."""
        self._snapshots.clear()
        return self.snapshots()

    def require_readable(self, what: str) -> None:
        """CorruptObject naming an unreadable snapshot, for ``what`` that must see every snapshot."""
        for name, exc in self.unreadable_snapshots.items():
            if isinstance(exc, NewerObject):  # not damage: forgetting it would delete another client's snapshot
                raise exc.explained(f"; {what} needs every snapshot")
            raise exc.explained(f"; {what} needs every snapshot: forget it by id first (`repair snapshots` "
                                "lists what it takes down)")

    def save_snapshot(self, snap: Snapshot, *, replace: bool = False, named: bool = False) -> Snapshot:
        """Store a new snapshot (a fresh random id; ``named``: the one ``new_snapshot_id`` gave it, which others
        may name as their parent before it is saved), or rewrite one in place (rebase).  One of version 2 raises
        the config to ``FORMAT_XATTRS`` first: a chunkvault before extended attributes would take it for damage
        and forget its parent from under it."""
        if named and not OBJECT_ID.fullmatch(snap.id):
            raise ValueError("a named snapshot needs an id from new_snapshot_id")
        if not replace and not named:
            snap.id = new_snapshot_id()
        elif not snap.id:
            raise ValueError("replacing a snapshot needs its id")
        if snap.version >= 2:
            self.raise_format(FORMAT_XATTRS)
        data = snap.encode(self.sealer)
        old = self.snapshot_digests.get(snap.id) if replace else None
        self.remote.put(f"snapshots/{snap.id}", data, if_absent=not replace)
        digest = content_name(data)[:32]
        if old is not None:
            self.replaced_digests.setdefault(snap.id, []).append((old, digest))
        self._snapshots[snap.id] = snap
        self._snapshot_seen[snap.id] = (len(data), None)
        self._decoded.pop(snap.id, None)
        self.snapshot_digests[snap.id] = digest
        self._listing = None
        return snap

    def take_replaced(self) -> dict[str, list[tuple[str, str]]]:
        """(old, new) digests of each snapshot rewrite this process made since last asked (for the ledger)."""
        taken, self.replaced_digests = self.replaced_digests, {}
        return taken

    def require_deletes(self, key: str, purpose: str) -> None:
        """Refuse before any work where the remote will refuse the deletions ``purpose`` needs (an
        append-only token, a bucket policy without delete): deleting ``key``, which no object has, is
        answered by the permission alone.  Found at the first deletion, a prune had uploaded its repack
        and a forget its rebased manifests, for nothing."""
        try:
            self.remote.delete(key)
        except PermissionDenied as exc:
            raise PermissionDenied(f"{purpose} deletes objects, and {self.remote.display_url} does not allow "
                                   f"it: {exc}") from None

    def save_snapshot_held(self, snap: Snapshot, lock: "RepoLock", *, named: bool = False) -> Snapshot:
        """Store a new snapshot that refers to data this command's ``lock`` kept a prune from deleting: the
        lock is looked at before and after (another host whose clock runs ahead may have taken it for stale,
        then pruned), and the snapshot taken back (LockLost) when it is gone.  A remote out of reach once the
        snapshot is stored leaves it: the look before stands.  A look within the last second (the one before
        the index object written just now) is that look: asked again, it was a round trip more per snapshot
        in a row, for a lock that goes stale in minutes."""
        lock.ensure_held()
        saved = self.save_snapshot(snap, named=named)
        try:
            lock.confirm()
        except LockLost:
            self.delete_snapshot(saved.id)
            raise
        except RemoteUnavailable:
            pass  # and the lock is left to go stale: removing it would wait as long again
        if self.on_saved is not None:
            batch = getattr(self._saves_held, "batch", None)
            if batch is not None:
                batch.append(saved)
            else:
                self.on_saved(saved)
        return saved

    @contextlib.contextmanager
    def saves_noted_together(self, still_held: Callable[[], None]) -> Iterator[Callable[[], None]]:
        """Inside, the new snapshots this thread stores under a lock are told to ``on_saved`` together, at each
        call of the function it gives and at its end, each time once ``still_held`` (the lock's ``confirm``)
        passes.  A copy told the client's ledger (a file of a line per snapshot, read and written whole) of each
        snapshot it stored: copying 16,000 snapshots took 4.5 minutes, each one costing more than the last.
        Told after the lock was lost, a forget of one of them meanwhile by another command of this client
        would be undone; left untold, the next listing takes them in as new."""
        batch: list[Snapshot] = []
        self._saves_held.batch = batch

        def note() -> None:
            if not batch or self.on_saved is None:
                return
            taken = batch[:]
            batch.clear()
            try:
                still_held()
            except ChunkvaultError:  # lost, or not to be confirmed now: not told
                return
            self.on_saved(*taken)

        try:
            yield note
        except BaseException:
            self._saves_held.batch = None
            with contextlib.suppress(Exception):  # the command's own error, not the ledger's, is the one to tell
                note()
            raise
        self._saves_held.batch = None
        note()

    def delete_snapshot(self, name: str) -> None:
        self.remote.delete(f"snapshots/{name}")
        self._forget_snapshot(name)

    def _forget_snapshot(self, name: str) -> None:
        """Drop what was kept of a snapshot that is gone: kept, each forgotten one's would add up in a
        process that backs up and forgets for months."""
        self._snapshots.pop(name, None)
        self._snapshot_seen.pop(name, None)
        self._decoded.pop(name, None)
        self.snapshot_digests.pop(name, None)
        self._listing = None

    # --- manifests ----------------------------------------------------------------------

    def manifest_records(self, snap: Snapshot, needed_by: Snapshot | None = None, *,
                         batched: bool = False) -> Iterator[Record]:
        """The records of one snapshot's own manifest (a differential's changes only).

        ``needed_by``: the snapshot whose chain this manifest is read for; a damaged manifest is an
        error naming both snapshots, not only a blob id the user cannot place.  ``batched``: its blobs read
        ``MANIFEST_BATCH`` at a time (``_prefetch``), for a walk of all of a large manifest that the blob
        cache does not hold (a copy's: a manifest of 118,000 blobs of 300 bytes took 10-12 s of CPU read one
        by one, 2.5 s so)."""
        ids = [bytes.fromhex(h) for h in snap.manifest]
        self.index  # loaded here: its own damage is not the manifest's
        blobs = (self._prefetch(ids, window=4 if self.remote.cheap_ranges else OBJECT_READERS, batch=MANIFEST_BATCH)
                 if batched else self._prefetch(ids))
        return iter_records(_manifest_blobs(blobs, snap, needed_by), _manifest_name(snap, needed_by))

    def manifests_ahead(self, order: Iterable[Snapshot]) -> "ManifestsAhead":
        """``manifest_records`` for snapshots asked for in ``order``, their manifests read ahead (a context)."""
        self.index  # loaded here: its own damage is not the manifests'
        return ManifestsAhead(self, order)

    def manifest_chunk_refs(self, snapshots: Iterable[Snapshot],
                            seen: set[tuple] | None = None) -> Iterator[tuple[Snapshot, bytes]]:
        """(snapshot, chunk ids concatenated) for the records of each snapshot's own manifest, in pieces;
        the segments ``manifest_record_runs`` skips are skipped."""
        for snap, records in self.manifest_record_runs(snapshots, seen):
            yield from ((snap, refs) for refs in _chunk_refs(iter(records)))

    def manifest_record_runs(self, snapshots: Iterable[Snapshot],
                             seen: set[tuple] | None = None) -> Iterator[tuple[Snapshot, Iterable[Record]]]:
        """(snapshot, records) for runs of the records of each snapshot's own manifest.

        A manifest segment (``manifest_seek.segments``) already decoded in this call, or listed in
        ``seen`` (keys of decoded segments; pass one set to several calls), is skipped: full
        snapshots of a mostly unchanged tree share most of their segments, so walking the
        references of many costs little more than one.
        """
        seen = set() if seen is None else seen
        self.index  # loaded here: its own damage is not a manifest's
        plans: list[tuple[Snapshot, list[bytes], list[Segment] | None, list[int]]] = []
        planned = set(seen)
        for snap in snapshots:
            ids = [bytes.fromhex(h) for h in snap.manifest]
            segs = segments(len(ids), snap.manifest_starts)
            if segs is None:  # no usable starts: the whole manifest, read on its own
                plans.append((snap, ids, None, []))
                continue
            todo = [seg for seg in segs if seg.key(ids) not in planned]
            planned.update(seg.key(ids) for seg in todo)
            plans.append((snap, ids, todo, sorted({i for seg in todo for i in range(seg.first, seg.last + 1)})))
        # One read-ahead across the snapshots: per snapshot, each one's first blob was asked for once the one
        # before had come, a round trip per snapshot in a row (a prune of 8,000 snapshots on a remote 50 ms
        # away: over six minutes of them).
        ahead = self._prefetch([ids[i] for _, ids, _, need in plans for i in need],
                               window=4 if self.remote.cheap_ranges else OBJECT_READERS, batch=MANIFEST_BATCH)
        for snap, ids, todo, need in plans:
            if todo is None:
                yield snap, self.manifest_records(snap)
                continue
            what = _manifest_name(snap, None)
            fetched = zip(need, _manifest_blobs(itertools.islice(ahead, len(need)), snap, None))
            held: dict[int, bytes] = {}
            for seg in todo:
                for j in [j for j in held if j < seg.first]:
                    del held[j]
                while seg.last not in held:
                    j, data = next(fetched)
                    held[j] = data
                buf = seg.join([held[i] for i in range(seg.first, seg.last + 1)])
                records, used = decode_records(buf, what)
                if used != len(buf):
                    raise CorruptObject(what, f"its record starts do not fit blob {ids[seg.first].hex()}")
                seen.add(seg.key(ids))  # only once decoded: a snapshot sharing a bad segment fails too
                yield snap, records

    def _read_ahead(self, blob_ids: list[bytes]) -> None:
        """Read ``blob_ids`` into the blob cache together (each to leave it at its first use), ``OBJECT_READERS``
        at a time, off local disk: the manifests of a chain are merged record by record, so each one's first
        blob was read only once the one before had come, a round trip per snapshot of the chain in a row (41 for
        ``ls`` of a 41st differential, and again for each snapshot a check walks).  A read that fails here is left
        to the reads in order, which say whose manifest it is.  Any other failure (the remote out of reach, a stop)
        is raised at once and stops the reads not yet begun: left to the reads in order, each read queued here
        waited out the remote's retry time first, one group of readers after another, then the first read in
        order waited it again."""
        if self.remote.cheap_ranges:
            return
        keys = list(dict.fromkeys(blob_ids))
        wanted = self._cache.expect(keys)
        if len(wanted) < 2:
            return
        missing = set(wanted)
        promised = [k for k in keys if k not in missing]
        put: list[bytes] = []

        def read(blob_id: bytes) -> None:
            with contextlib.suppress(CorruptObject):  # damage: named by the reads in order
                # Looked up without a hit: one another walk put meanwhile was promised to that walk.
                plain = self._cache.peek(blob_id)
                self._cache.put(blob_id, self._decode(blob_id) if plain is None else plain, once=True)
                put.append(blob_id)

        workers = min(OBJECT_READERS, len(wanted))
        try:
            for _ in parallel_map(read, wanted, workers=workers, max_in_flight=workers):
                pass
        except BaseException:  # the walk these were for fails with it: none of their hits will come
            self._cache.forgo([*promised, *put])
            raise

    def _prefetch(self, ids: list[bytes], window: int = 4, batch: int = 1) -> Iterator[bytes]:
        """Blobs in order, fetched a few ahead in parallel; with ``batch``, up to that many (and
        ``MANIFEST_BATCH_BYTES``) in each read (``read_blobs``: neighbours in a pack with one request, where one
        request each for a prune's walk of 290,000 manifest blobs took most of its time).  A batch that does
        not read is read blob by blob in order, so that what fails fails where it would have."""
        if len(ids) <= 1:
            yield from (self.read_blob(i) for i in ids)
            return
        groups: list[list[bytes]] = []
        size = 0
        for blob_id in ids:
            loc = self.locate(blob_id) if batch > 1 else None
            length = loc.raw_length if loc is not None else MANIFEST_BATCH_BYTES
            if not groups or len(groups[-1]) >= batch or size + length > MANIFEST_BATCH_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(blob_id)
            size += length

        def read(group: list[bytes]) -> list[bytes] | None:
            if len(group) == 1:
                return [self.read_blob(group[0])]
            try:
                return self.read_blobs(group)
            except (CorruptObject, ObjectNotFound, ObjectArchived):  # named by the reads one by one
                return None

        with ThreadPoolExecutor(min(window, len(groups))) as pool:
            futures: list[Future[list[bytes] | None]] = []
            pos = 0
            for i in range(len(groups)):
                while pos < len(groups) and pos < i + window:
                    futures.append(pool.submit(read, groups[pos]))
                    pos += 1
                got = futures[i].result()
                futures[i] = None  # type: ignore[call-overload]
                yield from (got if got is not None else (self.read_blob(b) for b in groups[i]))

    def chain_of(self, snap: Snapshot, snapshots: Iterable[Snapshot] | None = None) -> list[Snapshot]:
        """The snapshots from ``snap``'s full base to ``snap``, oldest first."""
        return self.chains(snapshots)(snap)

    def chains(self, snapshots: Iterable[Snapshot] | None = None) -> Callable[[Snapshot], list[Snapshot]]:
        """``chain_of`` for many snapshots of one listing, the listing indexed once: once per snapshot, a
        check or a forget's dry run over a year of hourly snapshots took minutes.  Without ``snapshots``, the
        listing a lock keeps (``kept_listing``), else one made now."""
        kept = self.kept_listing() if snapshots is None else None
        if kept is not None:
            indexed = self._kept_chains  # indexed once per listing: a chain asked for each of many snapshots
            if indexed is None or indexed[0] is not kept:
                indexed = self._kept_chains = (kept, self.chains(list(kept.values())))
            in_kept = indexed[1]

            def kept_chain(snap: Snapshot) -> list[Snapshot]:
                try:
                    return in_kept(snap)
                except MissingObject:  # a parent saved since it was made (another command's backup): list now
                    return self.chains(self.snapshots())(snap)

            return kept_chain
        by_id = {s.id: s for s in (snapshots if snapshots is not None else self.snapshots())}
        parents = {i: s.parent for i, s in by_id.items()}

        def chain_of(snap: Snapshot) -> list[Snapshot]:
            try:  # snap as given, whatever the listing holds under its id
                ids = chain.chain_to_base(snap.id, ChainMap({snap.id: snap.parent}, parents))
            except KeyError as exc:
                damaged = self.unreadable_snapshots.get(exc.args[0])
                if damaged is not None:
                    raise damaged.explained(f" (in the chain of snapshot {snap.id})") from None
                raise MissingObject(f"snapshots/{exc.args[0]}",
                                    f"parent in the chain of snapshot {snap.id} is missing") from None
            except ValueError as exc:
                raise CorruptObject(f"snapshots/{snap.id}", str(exc)) from None
            return [snap if i == snap.id else by_id[i] for i in ids]

        return chain_of

    def lookup(self, snap: Snapshot, path: bytes, snapshots: Iterable[Snapshot] | None = None, *,
               cache: bool = False) -> Record | None:
        """One path's resolved record, reading only the manifest blobs that can hold it (and its parents).
        ``cache``: the blobs read stay in the blob cache, for look-ups to come in the same manifests."""
        return chain.lookup(path, [seeker.find for _, seeker in self._seekers(snap, snapshots, cache)])

    def lookups(self, snap: Snapshot) -> Callable[[bytes], Record | None]:
        """``lookup`` of one path after another of ``snap``: the seekers in its chain's manifests made at the
        first and kept, with the blobs they read, where each path made them anew and read its blobs again (a
        diff looks up the file of each hard link whose content changed, each a read of the chain's manifests)."""
        finds: list[Callable[[bytes], Record | None]] = []

        def find(path: bytes) -> Record | None:
            if not finds:
                finds.extend(seeker.find for _, seeker in self._seekers(snap, None))
            return chain.lookup(path, finds)
        return find

    def tree_within(self, snap: Snapshot, directory: bytes, snapshots: Iterable[Snapshot] | None = None
                    ) -> "AheadWalk":
        """The records of ``tree`` of ``directory``, its subtree and the directories above it, reading only
        the manifest blobs that hold them: a restore of a few files from a large tree reads no more."""
        (first, full), *diffs = self._seekers(snap, snapshots)
        ahead = [bytes.fromhex(s.manifest[0]) for s, _ in [(first, full), *diffs] if len(s.manifest) == 1]
        return AheadWalk(lambda: self._read_ahead(ahead), lambda: chain.resolve(
            _nothing_deleted(full.within(directory), first, snap),
            [seeker.within(directory) for s, seeker in diffs if s.manifest]))

    def tree_shallow(self, snap: Snapshot, directory: bytes, snapshots: Iterable[Snapshot] | None = None
                     ) -> "AheadWalk":
        """The records of ``tree`` of ``directory``, of what lies directly in it and of the directories above it
        (``chain.in_listing``), reading only the parts of the manifests that hold them: a listing of the root
        without its subtrees read and resolved the whole tree."""
        (first, full), *diffs = self._seekers(snap, snapshots)
        ahead = [bytes.fromhex(s.manifest[0]) for s, _ in [(first, full), *diffs] if len(s.manifest) == 1]
        return AheadWalk(lambda: self._read_ahead(ahead), lambda: chain.resolve(
            _nothing_deleted(full.shallow(directory), first, snap),
            [seeker.shallow(directory) for s, seeker in diffs if s.manifest]))

    def manifest_records_within(self, snap: Snapshot, directory: bytes) -> Iterator[Record]:
        """The records of ``manifest_records`` on the way to ``directory`` (``chain.on_way_to``), found by
        seeking: what ``find`` needs of each manifest when its patterns name a directory."""
        return self._seeker(snap, snap).within(directory)

    def _seekers(self, snap: Snapshot, snapshots: Iterable[Snapshot] | None,
                 cache: bool = False) -> list[tuple[Snapshot, ManifestSeeker]]:
        """A seeker in each manifest of ``snap``'s chain, the full first."""
        return [(s, self._seeker(s, snap, cache)) for s in self.chain_of(snap, snapshots)]

    def _seeker(self, snap: Snapshot, needed_by: Snapshot, cache: bool = False) -> ManifestSeeker:
        self.index  # loaded here: its own damage is not a manifest's
        return ManifestSeeker(self._manifest_reader(snap, needed_by, cache),
                              [bytes.fromhex(h) for h in snap.manifest], snap.manifest_starts,
                              _manifest_name(snap, needed_by))

    def _manifest_reader(self, snap: Snapshot, needed_by: Snapshot, cache: bool = False
                         ) -> Callable[[bytes], Plaintext]:
        def read(blob_id: bytes) -> Plaintext:
            try:
                return self.read_blob(blob_id, cache=cache)
            except CorruptObject as exc:
                raise _manifest_damage(exc, snap, needed_by) from None
        return read

    def tree(self, snap: Snapshot, snapshots: Iterable[Snapshot] | None = None) -> "AheadWalk":
        """The complete tree of a snapshot, its chain resolved (ENTRY records, sorted)."""
        snaps = self.chain_of(snap, snapshots)
        # A differential with no records (nothing changed) changes nothing: no merge layer for it.
        ahead = [bytes.fromhex(s.manifest[0]) for s in snaps if s.manifest]
        return AheadWalk(lambda: self._read_ahead(ahead), lambda: chain.resolve(
            _nothing_deleted(self.manifest_records(snaps[0], snap), snaps[0], snap),
            [self.manifest_records(s, snap) for s in snaps[1:] if s.manifest]))


class AheadWalk:
    """A tree's records, its manifests' first blobs read ahead as the first record is asked for (or ``begin``):
    read ahead when the walk was made, a walk dropped unread (a listing given up, a diff left before its first
    change) left each blob counting a hit that never came, so every later walk was promised one more and took
    one, and they stayed in the cache for good.  The first record takes the hits: the merge reads each
    manifest's first blob to begin.  A diff begins both its walks before either's first record, for their
    chains share blobs: read ahead one after the other, the first walk's hits took the shared blobs out of
    the cache the second then read them again."""

    def __init__(self, ahead: Callable[[], None], walk: Callable[[], Iterator[Record]]):
        self._ahead = ahead
        self._walk = walk
        self._records: Iterator[Record] | None = None

    def begin(self) -> None:
        if self._records is None:
            self._ahead()
            self._records = self._walk()

    def __iter__(self) -> "AheadWalk":
        return self

    def __next__(self) -> Record:
        self.begin()
        assert self._records is not None
        return next(self._records)


def _lost_pack(key: str, blob_id: bytes) -> MissingObject:
    """An indexed pack that is not there: the index is stale until `repair index`."""
    return MissingObject(key, f"pack holding blob {blob_id.hex()} is missing (`check` names what it takes "
                              "down, `repair index` drops it from the index)")


def _nothing_deleted(records: Iterable[Record], full: Snapshot, needed_by: Snapshot) -> Iterator[Record]:
    """A full snapshot's records, in which a DELETE has nothing to remove (its manifest holds ENTRY records,
    store/FORMAT.md): one there, damaged or forged, made restore an internal error; it is the manifest's
    damage, named."""
    for rec in records:
        if rec.op == OP_DELETE:
            raise CorruptObject(_manifest_name(full, needed_by),
                                f"a full snapshot's manifest deletes {os.fsdecode(rec.path)!r}")
        yield rec


def _manifest_name(snap: Snapshot, needed_by: Snapshot | None) -> str:
    via = ""
    if needed_by is not None and needed_by.id != snap.id:
        via = f", which differential {needed_by.id[:8]} builds on"
    return f"manifest of snapshot {snap.id}{via}"


def _manifest_damage(exc: CorruptObject, snap: Snapshot, needed_by: Snapshot | None) -> CorruptObject:
    """A blob of ``snap``'s manifest failed: the same error, saying whose manifest it was."""
    return exc.explained(f" (in the {_manifest_name(snap, needed_by)})")


class ManifestsAhead:
    """The manifests of snapshots asked for in a known order (``records``), their blobs read ``window`` ahead by
    ``OBJECT_READERS`` threads: read one after another, a find or a forget's dry run over a year of hourly
    snapshots on S3 waited out some 9,000 round trips in a row.  A snapshot passed over (a damaged chain's) has
    what was read for it dropped (its records, read on after all, read the rest then); one not in the order is
    read as ``manifest_records`` reads it.  Each read raises (damage, a missing pack) when its snapshot's
    records reach it, as it would have read in turn.  A blob is read once while it is in the window or the
    blob cache: full snapshots of a mostly unchanged tree share most of their manifests' blobs."""

    def __init__(self, repo: "Repo", order: Iterable[Snapshot], window: int = OBJECT_READERS * 2):
        self._repo = repo
        self._queued: deque[tuple[str, bytes]] = deque((s.id, bytes.fromhex(h)) for s in order for h in s.manifest)
        self._ahead = {sid for sid, _ in self._queued}  # snapshots whose blobs are queued or read
        self._reading: deque[tuple[str, bytes, Future[Plaintext]]] = deque()
        self._window = window
        self._pool = ThreadPoolExecutor(min(window, OBJECT_READERS))

    def __enter__(self) -> "ManifestsAhead":
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def records(self, snap: Snapshot) -> Iterator[Record]:
        if snap.id not in self._ahead:
            return self._repo.manifest_records(snap)
        while self._reading and self._reading[0][0] != snap.id:  # passed over: dropped
            self._ahead.discard(self._reading.popleft()[0])
        while not self._reading and self._queued and self._queued[0][0] != snap.id:
            self._ahead.discard(self._queued.popleft()[0])
        self._ahead.discard(snap.id)
        return iter_records(_manifest_blobs(self._blobs(snap), snap, None), _manifest_name(snap, None))

    def _blobs(self, snap: Snapshot) -> Iterator[bytes]:
        for i, _ in enumerate(snap.manifest):
            while self._queued and len(self._reading) < self._window:
                sid, blob_id = self._queued.popleft()
                read = next((f for _, b, f in self._reading if b == blob_id), None)
                if read is None:
                    read = self._pool.submit(self._repo.read_blob, blob_id, cache=True)
                self._reading.append((sid, blob_id, read))
            if not self._reading or self._reading[0][0] != snap.id:
                # passed over while half read (another snapshot's records asked for first), then read on: the
                # rest is read now; stopped here, its records ended inside one, taken for a damaged manifest
                yield from (self._repo.read_blob(bytes.fromhex(h), cache=True) for h in snap.manifest[i:])
                return
            yield self._reading.popleft()[2].result()


def _manifest_blobs(blobs: Iterator[bytes], snap: Snapshot, needed_by: Snapshot | None) -> Iterator[bytes]:
    try:
        yield from blobs
    except CorruptObject as exc:
        raise _manifest_damage(exc, snap, needed_by) from None


def _chunk_refs(records: Iterator[Record], batch: int = 4096) -> Iterator[bytes]:
    """The chunk ids of ``records``' entries, concatenated, ``batch`` records at a time."""
    pending: list[bytes] = []
    for rec in records:
        if rec.entry is not None and rec.entry.chunks:
            pending.append(rec.entry.chunks)
            if len(pending) >= batch:
                yield b"".join(pending)
                pending.clear()
    if pending:
        yield b"".join(pending)


class BlobWriter:
    """Collects new blobs into packs, uploads full packs in the background, writes index objects.

    ``claim`` makes deduplication exact while blobs are in flight: only the
    first caller for an id compresses and stores it.
    """

    INDEX_EVERY_PACKS = 16
    INDEX_EVERY_SECONDS = 120.0
    # Or once the packs not indexed yet hold this much of an index object (45 bytes an entry): with blobs of
    # 256 bytes, 16 packs were some 900,000 entries, held till then, and three times over while encoded.
    INDEX_EVERY_BYTES = 8 << 20

    def __init__(self, repo: Repo, upload_workers: int = 2):
        self.repo = repo
        self.pack_size = min(repo.config.settings.pack_size, MAX_PACK_SIZE)  # one set larger before the bound
        # The storage's limit on an object's size (the HTTP service's --max-object-size): packs close before
        # they would outgrow it, where a backup's every large file failed at the upload of its first pack.
        self.max_object_size = repo.remote.max_object_size
        if self.max_object_size is not None:
            self.pack_size = max(1, min(self.pack_size, self.max_object_size))
        self._lock = threading.Lock()
        self._pending: set[bytes] = set()
        # One buffer per pack in flight and one filling; a large envelope can push a pack past pack_size.
        self._buffers = PackBuffers(self.pack_size + self.pack_size // 4, upload_workers + 1)
        self._builder = PackBuilder(self._buffers)
        self._builder_no: int | None = None
        self._uploads: ThreadPoolExecutor = ThreadPoolExecutor(upload_workers)
        self._in_flight: list[Future[None]] = []
        self._slots = threading.Semaphore(upload_workers)
        self._unindexed = IndexData()
        self._unindexed_bytes = 0  # its packs' share of an index object's plaintext
        self._last_index = time.monotonic()
        self.new_blobs = 0
        self.new_raw_bytes = 0
        self.stored_bytes = 0
        self.delta_blobs = 0
        self.delta_bytes = 0
        self.index_names: list[str] = []
        self._error: BaseException | None = None
        self._cause: BaseException | None = None  # what stopped the work, where ``abandon`` was told
        # Called before each index object is written; raises when the command's lock may have gone stale
        # (``RepoLock.ensure_held``): a prune may have deleted the packs as unindexed meanwhile, and an index
        # naming them would have later backups deduplicate against data that is gone.
        self.guard: Callable[[], None] = lambda: None
        self.damaged: set[bytes] = set()  # blobs the command found unreadable: never deduplicated against
        self.damaged_packs: dict[int, bytes] = {}  # packs it found them in (-> one of them): their others are read
        self._verified: dict[bytes, bool] = {}  # blobs of those packs read whole (``_reads``)
        # The packs of the blobs it deduplicated against, and a listing of data/ taken from the first on:
        # ``flush`` checks they are stored (``_check_deduplicated``).
        self._deduplicated: dict[bytes, int] = {}  # -> the end of the last byte it refers to there
        self._stored: Future[dict[bytes, int]] | None = None
        self._listing: ThreadPoolExecutor | None = None  # its own thread: a listing holds up no upload
        self._own_packs: set[bytes] = set()  # stored by this writer: known to be there
        self._abandoned = False
        # Packs handed to the remote, answered or not (a lost reply may hide a stored one): what a caller that
        # takes its work back (a failed repack) deletes.
        self.sent_packs: list[bytes] = []
        # Whether ``close`` indexes the packs stored when the work stopped short: a backup's rerun reuses
        # them; a prune's would repack into new packs anyway, so its are left for it to delete.
        self.index_on_close = True
        self._settled = True  # every blob it placed is in an index object it wrote (or it placed none)
        repo._writer_lock.acquire()  # after another thread's writer, if one runs (``close`` in this thread frees it)
        try:
            with repo._index_lock:
                if repo._index_unsettled and not repo._writers:  # one stopped short before: read again
                    repo._index, repo._index_unsettled = None, False
            repo.withhold_unreadable_deltas()
        except BaseException:
            repo._writer_lock.release()
            self._uploads.shutdown(wait=False)
            raise
        with repo._index_lock:  # the index holds what this writer stores until its index objects do
            repo._writers += 1
        self._counted = True

    def claim(self, blob_id: bytes) -> bool:
        """True when the caller must store this blob (not in the repository, not in flight).  One found
        damaged meanwhile (``damaged``) is an error: its id would refer to the damaged copy, which readers
        may take over any other.  So is one in a pack found damaged (``damaged_packs``) that does not read
        whole now (read once: a flipped byte elsewhere in the pack costs it nothing)."""
        index = self.repo.index
        with self._lock, self.repo._index_lock:
            if blob_id not in self._pending and blob_id not in index:
                self._pending.add(blob_id)
                return True
            if blob_id in self.damaged:
                raise CorruptObject(f"blob {blob_id.hex()}", "is damaged in the repository, and this would "
                                    "refer to it again: run `chunkvault check --read-data`, then `repair "
                                    "packs` for the packs it names, and back up again")
            loc = index.get(blob_id) if blob_id not in self._pending else None
            pack_id = self.repo.pack_ids[loc.pack_no] if loc is not None else None
            if pack_id is not None:  # None: in flight from this process
                self._note_deduplicated(pack_id, loc.offset + loc.length)
        if loc is not None and loc.pack_no in self.damaged_packs and not self._reads(blob_id):
            pack_id = self.repo.pack_ids[loc.pack_no]
            raise CorruptObject(pack_key(pack_id) if pack_id else f"blob {blob_id.hex()}",
                                f"is damaged (blob {self.damaged_packs[loc.pack_no].hex()} there does not read, "
                                f"nor does blob {blob_id.hex()}, which this would refer to again): run "
                                "`chunkvault check --read-data`, then `repair packs` for the packs it names, "
                                "and back up again")
        return False

    def _note_deduplicated(self, pack_id: bytes, end: int = 0) -> None:
        """Remember a pack a blob was deduplicated against, and where in it that blob ends; the first one starts
        a listing of data/."""
        if end > self._deduplicated.get(pack_id, -1):
            self._deduplicated[pack_id] = end
        if self._stored is None:
            self._listing = ThreadPoolExecutor(1)
            self._stored = self._listing.submit(self.repo.stored_packs)

    def _reads(self, blob_id: bytes) -> bool:
        """Whether a blob (and its delta bases) reads and verifies, asked once per blob."""
        if blob_id not in self._verified:
            try:
                self.repo.read_blob(blob_id, verify=True)
                self._verified[blob_id] = True
            except CorruptObject:
                self._verified[blob_id] = False
        return self._verified[blob_id]

    def add(self, blob_id: bytes, data: bytes | memoryview) -> bool:
        if not self.claim(blob_id):
            return False
        self.store(self.repo.prepare_blob(blob_id, data))
        return True

    def store(self, blob: PreparedBlob) -> None:
        self.store_many((blob,))

    def store_many(self, blobs: Iterable[PreparedBlob]) -> None:
        """Add prepared blobs to the pack being built, under one lock for all of them (a backup of small
        files stores tens of thousands, each a few microseconds of Python that holds the GIL); packs that
        fill up go to upload."""
        if self._error is not None:
            raise self._error
        full = []
        limit = self.max_object_size
        blobs = iter(blobs)
        with self._lock, self.repo._index_lock:
            while True:  # the blobs that go into one pack, indexed in one call
                builder = self._builder
                offsets: list[int] = []
                placed: list[PreparedBlob] = []
                carried = None  # a blob the pack has no room for under the storage's limit: the next one's first
                for blob in blobs:
                    if limit is not None and not self._fits(builder, blob, limit):
                        carried = blob
                        break
                    offsets.append(len(builder))
                    placed.append(blob)
                    builder.add(blob.blob_id, blob.kind, blob.envelope, blob.raw_length, blob.base_id)
                    if len(builder) >= self.pack_size:
                        break
                if placed:
                    self._place(placed, offsets)
                    self._note_bases(placed)
                if carried is None and len(builder) < self.pack_size:
                    break
                full.append(self._take_builder())
                if carried is not None:
                    blobs = itertools.chain((carried,), blobs)
        for builder, pack_no in full:
            self._submit(builder, pack_no)

    def _note_bases(self, placed: list[PreparedBlob]) -> None:
        """The packs of the delta bases these blobs are stored against, down their chains, checked at ``flush``
        as those of deduplicated blobs are: a copy stores a delta on a base it never reads there (the source
        gives its plaintext), and on one in a pack that is gone it saved a snapshot no one could read."""
        index = self.repo.index
        for blob in placed:
            base = blob.base_id if blob.kind == KIND_DELTA else None
            for _ in range(self.repo.max_delta_depth):
                loc = index.get(base) if base is not None else None
                if loc is None:
                    break
                pack_id = self.repo.pack_ids[loc.pack_no]
                if pack_id is not None:  # None: in flight from this process
                    self._note_deduplicated(pack_id, loc.offset + loc.length)
                base = index.base_of(base)

    def _place(self, placed: list[PreparedBlob], offsets: list[int]) -> None:
        """Index blobs just added to the pack being built (at ``offsets``), under the writer's lock."""
        index = self.repo.index
        if self._builder_no is None:
            self._builder_no = self.repo.pack_no(None)
        index.add_many([b.blob_id for b in placed], self._builder_no, offsets,
                       [len(b.envelope) for b in placed], [b.raw_length for b in placed],
                       [b.kind for b in placed], [b.base_id for b in placed])  # (a delta's base with its row)
        self._settled = False
        for blob in placed:
            self._pending.discard(blob.blob_id)
            self._count(blob)

    def _fits(self, builder: PackBuilder, blob: PreparedBlob, limit: int) -> bool:
        """Whether ``blob`` still fits into the pack under the storage's ``limit`` on an object's size; one
        that fits in no pack is an error that names the limit it needs (not as a backup's: a copy, an import
        or a WAL push writes through here too)."""
        if builder.finished_size(len(blob.envelope), blob.kind) <= limit:
            return True
        if builder.entries:
            return False
        needed = PackBuilder().finished_size(len(blob.envelope), blob.kind)
        raise RemoteError(f"{self.repo.remote.display_url} takes objects of at most {limit} bytes, and a pack "
                          f"holding one chunk to store needs {needed}: raise that limit (the service's "
                          "--max-object-size)")

    def _count(self, blob: PreparedBlob) -> None:
        self.new_blobs += 1
        self.new_raw_bytes += blob.raw_length
        self.stored_bytes += len(blob.envelope)
        if blob.kind == KIND_DELTA:
            self.delta_blobs += 1
            self.delta_bytes += len(blob.envelope)

    def _take_builder(self) -> tuple[PackBuilder, int]:
        b, no = self._builder, self._builder_no
        self._builder, self._builder_no = PackBuilder(self._buffers), None
        assert no is not None
        return b, no

    def abandon(self, cause: BaseException | None = None) -> None:
        """The work stopped short (a failure, Ctrl-C): packs not yet handed to an upload are dropped, their
        blobs left to the next run, so that a stop on a slow link waits for the uploads under way only,
        not for every pack the pipeline still fills.  What was uploaded is indexed by ``close``, unless
        ``cause`` is the remote given up on."""
        self._abandoned = True
        self._cause = self._cause or cause

    def _submit(self, builder: PackBuilder, pack_no: int) -> None:
        if self._abandoned:
            return
        self._slots.acquire()  # bounds packs held in memory
        if self._abandoned:  # while this waited for a slot
            self._slots.release()
            return
        fut = self._uploads.submit(self._upload, builder, pack_no)
        with self._lock:
            self._in_flight = [f for f in self._in_flight if not f.done()] + [fut]

    def _upload(self, builder: PackBuilder, pack_no: int) -> None:
        try:
            if self._error is not None:  # one upload failed: the packs queued behind it are not tried too,
                raise self._error        # each for its whole retry time (minutes, with small packs)
            data = builder.finish(self.repo.sealer)
            pack_id = bytes.fromhex(content_name(data))
            self.sent_packs.append(pack_id)
            try:
                self.repo.remote.put(pack_key(pack_id), data, if_absent=True)
            except ObjectExists:
                pass  # same name, same bytes
            del data
            builder.release()  # only once stored: a failed upload's buffer is left to the garbage collector
            self.repo.set_pack_id(pack_no, pack_id)
            self._own_packs.add(pack_id)
            need = pack_index_bytes(builder.entries)
            with self._lock:
                # Many small blobs in small packs: an index object must still fit under the storage's limit.
                full = (self.max_object_size is not None and self._unindexed.packs
                        and self._unindexed_bytes + need > self.max_object_size - INDEX_SLACK)
                before = self._take_index() if full else None
                # Encoded (45 bytes an entry): a prune repacking most of a million blobs held a PackEntry each.
                self._unindexed.packs[pack_id] = EncodedEntries.of(builder.entries)
                self._unindexed_bytes += need
                due = (len(self._unindexed.packs) >= self.INDEX_EVERY_PACKS
                       or self._unindexed_bytes >= self.INDEX_EVERY_BYTES
                       or time.monotonic() - self._last_index > self.INDEX_EVERY_SECONDS)
                batch = self._take_index() if due else None
            for done in (before, batch):
                if done is not None:
                    self._write_index(done)
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._slots.release()

    def _check_deduplicated(self) -> None:
        """MissingObject for a pack it deduplicated against that is not stored: the index lists a pack that
        is gone (deleted by hand or a lifecycle rule, or an old index put back after a prune deleted it), and
        a snapshot would refer to data no one can read, with every file saved as if stored.  CorruptObject for
        one stored shorter than the end of a blob it refers to there (cut short, or emptied, by whoever holds
        the storage): the listing's size says so without reading it."""
        if self._stored is None:
            return
        stored = self._stored.result()
        unlisted = sorted(self._deduplicated.keys() - stored.keys() - self._own_packs)  # stored after the listing?
        with ThreadPoolExecutor(max(1, min(OBJECT_READERS, len(unlisted)))) as pool:
            found = list(pool.map(lambda pid: self.repo.remote.stat(pack_key(pid)), unlisted))
        sizes = dict(stored)
        for pack_id, info in zip(unlisted, found):
            if info is None:
                raise MissingObject(pack_key(pack_id), "is listed by the index but not stored, and this would "
                                    "refer to blobs it held: run `chunkvault repair index` (it drops the pack "
                                    "from the index, and the next backup stores that data again)")
            sizes[pack_id] = info.size
        for pack_id, end in sorted(self._deduplicated.items()):
            if pack_id not in self._own_packs and sizes.get(pack_id, end) < end:
                raise CorruptObject(pack_key(pack_id), f"is stored with {sizes[pack_id]} bytes, fewer than the "
                                    f"{end} its index places blobs this would refer to in (cut short): run "
                                    "`chunkvault check`, then `repair packs` for the packs it names, and back "
                                    "up again")
        self._deduplicated.clear()

    def _take_index(self) -> IndexData:
        batch, self._unindexed, self._unindexed_bytes = self._unindexed, IndexData(), 0
        self._last_index = time.monotonic()
        return batch

    def _write_index(self, batch: IndexData) -> None:
        self.guard()
        self.index_names.append(self.repo.write_index(batch))

    def flush(self, *, write_index: bool = True) -> None:
        """Upload the partial pack and wait for every upload; write the remaining index (or keep it for ``take_index``)."""
        with self._lock:
            part = self._take_builder() if self._builder.entries else None
        if part is not None:
            self._submit(*part)
        for f in list(self._in_flight):
            f.result()
        if self._error is not None:
            raise self._error
        self._check_deduplicated()
        if not write_index:
            return
        with self._lock:
            batch = self._take_index() if self._unindexed.packs else None
        if batch is not None:
            self._write_index(batch)
        self._settled = True

    def take_index(self) -> IndexData:
        """The index entries of uploaded packs not yet written to an index object."""
        with self._lock:
            return self._take_index()

    def close(self) -> None:
        """Wait for the uploads in flight; then index every pack that was stored whole but not yet indexed
        (only left when the work stopped short: an interruption, a failure), so that running it again stores
        them no second time; not with ``index_on_close`` off, nor once the remote was given up on: the index
        object would wait out the whole retry time again, doubling the wait that ``retry-time`` bounds (a
        rerun stores those packs' blobs again, and prune clears the packs).  Best effort: the error that
        stopped the work is the one that counts."""
        try:
            self._uploads.shutdown(wait=True)
            if self._listing is not None:
                self._listing.shutdown(wait=True)
            self._buffers.clear()
            with self._lock:
                batch = self._take_index() if self._unindexed.packs else None
            gone = any(RemoteUnavailable.gave_up_on(e, self.repo.remote.display_url)
                       for e in (self._error, self._cause))
            if batch is not None and self.index_on_close and not gone:
                try:
                    self._write_index(batch)
                except ChunkvaultError:
                    pass
        finally:
            with self.repo._index_lock:
                if self._counted:
                    self._counted = False
                    self.repo._writers -= 1
                    self.repo._index_unsettled |= not self._settled
                    self.repo._writer_lock.release()

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self.abandon(exc)
        self.close()


class SavesAfterIndex:
    """Snapshot writes that refer to blobs ``writer`` stores, each held until an index object lists those blobs,
    then done in the order given.  A command that writes many small snapshots (``copy``, ``rewrite``) flushed its
    writer before each, an index object per snapshot: a copy of 2,000 left 2,000 of them, all read at every
    later open.  Held, they go together as a backup's index goes: once the writer has written an index object
    of its own (``INDEX_EVERY_PACKS``, ``INDEX_EVERY_BYTES``), once the first held has waited
    ``INDEX_EVERY_SECONDS``, and at ``flush``.  Killed meanwhile, the held snapshots are not saved (a rerun
    writes them again), and no snapshot saved refers to a blob that no index object lists."""

    def __init__(self, writer: BlobWriter, flush: Callable[[], None] | None = None):
        self.writer = writer
        self._flush = flush if flush is not None else writer.flush  # the caller's, wrapped as it needs
        self._held: list[Callable[[], None]] = []
        self._since = 0.0
        self._indexes = len(writer.index_names)

    def then(self, write: Callable[[], None]) -> None:
        """Do ``write`` once the blobs stored so far are indexed (now, when that is due)."""
        if not self._held:
            self._since = time.monotonic()
        self._held.append(write)
        if (len(self.writer.index_names) > self._indexes
                or time.monotonic() - self._since >= self.writer.INDEX_EVERY_SECONDS):
            self.flush()

    def flush(self) -> None:
        """Upload what is stored, write its index, then the held writes (a failure stops at that one)."""
        if not self._held:
            return
        self._flush()
        self._indexes = len(self.writer.index_names)
        held, self._held = self._held, []
        for write in held:
            write()


class CountingWriter(BlobWriter):
    """A dry run's writer: claims and counts what a backup would store (compressed, or as a delta),
    and stores nothing: no pack, no index entry."""

    def __init__(self, repo: Repo):  # no buffers, no upload threads: nothing is written
        repo.withhold_unreadable_deltas()
        self.repo = repo
        self._lock = threading.Lock()
        self._pending = set()
        self.new_blobs = self.new_raw_bytes = self.stored_bytes = self.delta_blobs = self.delta_bytes = 0
        self.index_names = []
        self._error = self._cause = None
        self.damaged = set()
        self.damaged_packs = {}
        self._verified = {}

    def _note_deduplicated(self, pack_id: bytes, end: int = 0) -> None:
        pass  # nothing is written, so nothing would refer to a pack that is gone

    def store_many(self, blobs: Iterable[PreparedBlob]) -> None:
        with self._lock:
            for blob in blobs:
                self._count(blob)

    def flush(self, *, write_index: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _keys_named(name: str, keys: list[str]) -> list[str]:
    """The keys ``name`` names: the one it is in full, else those it begins.  A name another begins with (a
    copy kept beside a key file, ``ID.bak``) made the full id ambiguous, and that key impossible to name."""
    return [name] if name in keys else [k for k in keys if k.startswith(name)]


def short_key_names(keys: Iterable[str]) -> dict[str, str]:
    """Each key's name to show: its first 12 characters where only it begins with them (so `key remove` takes
    them), else in full (beside a copy ``ID.bak`` the 12 characters name both, and the full id names one)."""
    keys = list(keys)
    short = Counter(k[:12] for k in keys)
    return {k: k[:12] if short[k[:12]] == 1 else k for k in keys}


def _distinct_prefixes(keys: list[str]) -> list[str]:
    """``keys`` sorted, each as ``short_key_names`` shows it."""
    shown = short_key_names(keys)
    return [shown[k] for k in sorted(keys)]
