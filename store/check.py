"""Repository verification: structure always, every byte with ``read_data``.

Problems are collected, never raised one at a time: the report names every
bad object and, for missing or corrupt data, the snapshots and files it
affects, so an operator knows what a damaged repository still restores.
"""
from __future__ import annotations

import os
import random
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import blake3

from chunkvault.errors import (NOT_DAMAGE, ChunkvaultError, CorruptObject, NewerObject, ObjectArchived,
                               ObjectNotFound, RepositoryStateWarning, UsageError)
from chunkvault.remotes.layer import parallel_map
from chunkvault.units import parse_size

from . import _blobtable, forked
from .blob import KIND_DELTA, open_blob
from .blobindex import BlobIndex
from .chain import broken_chains, resolving_chains
from .config import KeyFile, open_config, peek_config
from .confinement import Confinement
from .crypto import content_name
from .indexfile import IndexColumns
from .manifest import T_FILE, T_HARDLINK, Record, unread
from .deltacheck import delta_problems, unreadable_marks
from .pack import PACK_FIXED_OVERHEAD, PackEntry, decode_entries, fetch_header, read_windows
from .repository import (NOT_INDEXED, OBJECT_READERS, WORKERS, Repo, pack_id_of, pack_key, short_key_names,
                         superseded_names)
from .snapshot import Snapshot
from .unlock import KEY_IMPORT_HINT, read_key_file
from .walarchive import PUSH_AGAIN, WAL_PREFIX, WalFile, load_all


#: Where a pack's index entries lie: (an index object's columns, entries, start) for each object listing it.
#: Check decodes a pack's entries when it checks that pack: an object per entry of every pack, held from
#: start to end, took about 230 bytes a blob (11 GB for a repository of 50 million).
EntrySources = list[tuple[IndexColumns, int, int]]
#: A pack to check: its id, size, where its index entries lie, and whether every byte is read.
PackTask = tuple[bytes, int, EntrySources, bool]
#: Bytes to read from which ``check --read-data`` on local disk forks a worker per core (as restore does).
FORK_MIN_BYTES = 64 << 20

#: Bytes of a pack that ``check --read-data`` holds at once where ranged reads are cheap (local disk).
#: Whole packs, one per thread, cost 30 MB more at peak and were slower: each faulted in fresh pages.
PACK_READ_WINDOW = 1 << 20
NOT_ITS_NAME = "content does not match its name"


@dataclass
class Problem:
    object: str
    problem: str
    snapshots: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # the first MAX_FILES ("id8:path", the path as os.fsdecode gives it)
    more_files: int = 0  # and how many more it takes down

    def to_dict(self) -> dict:
        return {"object": self.object, "problem": self.problem, "snapshots": self.snapshots, "files": self.files,
                "more_files": self.more_files}


#: Files a problem names; beyond them, only their number.
MAX_FILES = 100


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    snapshots: int = 0
    packs: int = 0
    blobs: int = 0
    packs_read: int = 0
    blobs_read: int = 0
    bytes_read: int = 0
    wal_files: int = 0
    #: With a --read-data-subset: how many packs it chose to read (a slice ``n/m`` may hold none).
    packs_chosen: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": [p.to_dict() for p in self.problems], "warnings": self.warnings,
                "snapshots": self.snapshots, "packs": self.packs, "blobs": self.blobs,
                "packs_read": self.packs_read, "blobs_read": self.blobs_read, "bytes_read": self.bytes_read,
                "wal_files": self.wal_files}


def parse_subset(spec: str | None) -> Callable[[Mapping[bytes, int]], set[bytes]] | None:
    """Which of the packs (id -> size) a ``--read-data-subset`` reads: ``n/m`` the n-th of m slices by pack
    id, so that m runs with n = 1..m read every pack once; ``P%`` that share of the packs (rounded, at least
    one), drawn at random (each pack drawn by chance alone read none at all in some runs); a size
    (``500M``, ``2G``) packs drawn at random until they hold at least that many bytes, or all of them."""
    if spec is None:
        return None
    spec = spec.strip()
    try:
        if spec.endswith("%"):
            share = float(spec[:-1]) / 100.0
            if not 0 < share <= 1:
                raise ValueError
            return lambda packs: set(random.sample(list(packs), max(1, round(len(packs) * share)) if packs else 0))
        if "/" not in spec:
            if spec[-1:].isdigit():  # "3" would be three bytes: a slip for "1/3" or "3%" more likely
                raise ValueError
            return _packs_holding(parse_size(spec))
        n, m = (int(x) for x in spec.split("/"))
        if not 1 <= n <= m:
            raise ValueError
    except (ValueError, UsageError):
        raise UsageError(f"bad read-data subset {spec!r}: use n/m (1 <= n <= m), a percentage like 10% "
                         "or a size like 500M").hinting(" (--read-data-subset)") from None
    return lambda packs: {pid for pid in packs if int.from_bytes(pid[:4], "big") % m == n - 1}


def _packs_holding(size: int) -> Callable[[Mapping[bytes, int]], set[bytes]]:
    def select(packs: Mapping[bytes, int]) -> set[bytes]:
        order = list(packs)
        random.shuffle(order)
        chosen: set[bytes] = set()
        held = 0
        for pid in order:
            if held >= size:
                break
            chosen.add(pid)
            held += packs[pid]
        return chosen
    return select


class Checker:
    def __init__(self, repo: Repo, *, read_data: bool = False, subset: str | None = None,
                 progress: Callable[[int, int, int], None] | None = None):
        self.repo = repo
        self.progress = progress  # (packs checked, bytes read, bytes to read)
        self.read_data = read_data or subset is not None
        self.select = parse_subset(subset)
        self.report = CheckReport()
        self.wal: list[WalFile] = []  # the archived files that opened
        self.bad_blobs: dict[bytes, Problem] = {}
        self._baseless: list[tuple[Problem, bytes, bytes]] = []  # (problem, base, pack of the delta)
        self.bad_manifests: dict[str, Problem] = {}  # snapshot id -> its manifest's problem
        self.index_damaged = False  # an index object did not load: unindexed packs may be its
        self.index = BlobIndex(0)  # the stored index objects' (``_load_index``), this check's own view
        self._lock = threading.Lock()
        self._stop = threading.Event()  # the check was stopped: the packs not yet begun are not read

    def problem(self, obj: str, what: str) -> Problem:
        p = Problem(obj, what)
        with self._lock:
            self.report.problems.append(p)
        return p

    def run(self) -> CheckReport:
        repo = self.repo
        self._check_config_and_keys()
        # Snapshots before the index, the index before the packs: a backup running meanwhile (it takes a shared
        # lock too) indexes its blobs before it saves its snapshot, so what these snapshots need is indexed.
        snapshots = self._load_snapshots()
        wal = self._load_wal()
        indexed = self._load_index()
        todo, to_read = self._pack_todo(indexed)
        if self.progress is not None:  # the total at once, 0 too (no packs: no pack's progress would tell it)
            self.progress(0, 0, to_read)
        forking = to_read >= FORK_MIN_BYTES and forked.cores() > 1 and forked.can_fork(repo.remote)
        if forking:
            try:
                self._check_packs_forked(todo, to_read, snapshots)
            except forked.WorkersNotStarted as exc:  # under a low limit: the packs are read here instead
                self.report.warnings.append(f"{exc}; the packs were read in this process instead")
                forking = False
        if not forking:
            # Pack reads run on their own threads (native work, GIL released) while this
            # thread walks the manifests: the two overlap instead of adding up.
            packs_error: list[BaseException] = []
            packs = threading.Thread(target=self._check_packs, args=(todo, to_read, packs_error), name="check-packs")
            packs.start()
            try:
                self._check_references(snapshots)
                packs.join()
            except BaseException:  # Ctrl-C, say: the packs not yet begun are left, the one in hand finished
                self._stop.set()
                packs.join()
                raise
            if packs_error:
                raise packs_error[0]
        self._check_wal(wal)
        if self.bad_blobs:
            self._spare_copied()
        if self.bad_blobs or self.bad_manifests:
            self._attribute(snapshots)
        if self.bad_blobs:
            self._attribute_wal(wal)
        return self.report

    def _load_wal(self) -> list[WalFile]:
        """Every ``wal/`` object decoded (before the index, as snapshots: a push indexes its blobs first)."""
        files, bad = load_all(self.repo, fresh=True)  # the stored objects: a cached copy hides their damage
        for name, exc in sorted(bad.items()):
            if isinstance(exc, NewerObject):
                self.report.warnings.append(f"{exc}; not checked")
            else:
                self.problem(f"{WAL_PREFIX}{name}", _said(exc, f"{WAL_PREFIX}{name}"))
        self.report.wal_files = len(files)
        self.wal = files
        return files

    def _check_wal(self, files: list[WalFile]) -> None:
        """Each archived file's blobs in the index, and what their lengths add up to against its size: a
        restore of it (``archive-get``) writes nothing unless both hold."""
        index = self.index
        for w in files:
            ids = w.blob_ids()
            self._report_unindexed(b"".join(ids))
            held = [index.get(b) for b in ids]
            if all(loc is not None for loc in held) and sum(loc.raw_length for loc in held) != w.size:
                self.problem(f"{WAL_PREFIX}{w.name}", f"records a size of {w.size} bytes, and its blobs hold "
                                                      f"{sum(loc.raw_length for loc in held)}: archive-get refuses it")

    def _attribute_wal(self, files: list[WalFile]) -> None:
        """Name each archived file a bad blob (or a base its delta needs) takes down, with what heals it: the
        repairs that serve snapshots do nothing for a ``wal/`` object."""
        for w in files:
            bad = next((p for b in w.blob_ids() if (p := self._bad(b)) is not None), None)
            if bad is not None:
                self.problem(f"{WAL_PREFIX}{w.name}", f"archive-get fails: it needs {bad.object}, which is "
                                                      f"damaged or missing; {_WAL_REMEDY}")

    def _spare_copied(self) -> None:
        """A damaged (or lost) copy of a blob stored twice takes no file down while another copy reads:
        reads go to that one.  Its problem stays (`repair packs` drops the damaged copy), saying so, and no
        file is named for it.  Only blobs with other copies are read again here."""
        repo = self.repo
        for blob_id in [b for b in self.bad_blobs if repo.stored_twice(b)]:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RepositoryStateWarning)  # the switch to the other copy
                    repo.read_blob(blob_id, verify=True)
            except NOT_DAMAGE:
                raise
            except ChunkvaultError:
                continue
            p = self.bad_blobs.pop(blob_id)
            if p.object == f"blob {blob_id.hex()}":  # its own problem (a lost pack's is its other blobs' too)
                p.problem += " (another copy of it reads: no file is lost; restores read that one)"

    def _check_config_and_keys(self) -> None:
        """The objects that open the repository, read again: a Repository kept open since (a service's)
        would otherwise go on checking and backing up a repository that nothing opens any more."""
        repo = self.repo
        try:
            raw = repo.remote.get("config")
            stored = peek_config(raw)["id"]
            if stored != repo.config.repo_id:
                self.problem("config", f"another repository's (id {stored[:16]}, not {repo.config.repo_id[:16]}): "
                                       "one made anew at this place, or a config copied from another")
            else:
                open_config(raw, repo.sealer)
        except ObjectNotFound:
            self.problem("config", f"missing: nothing opens the repository without it{KEY_IMPORT_HINT}")
        except NOT_DAMAGE:  # here and below: the remote gave up, or refused access: nothing said of the object
            raise
        except ChunkvaultError as exc:
            self.problem("config", (exc.reason if isinstance(exc, CorruptObject) else str(exc)) + KEY_IMPORT_HINT)
        readable = 0
        shown = short_key_names(k.key.split("/", 1)[1] for k in repo.remote.list("keys/"))
        for name, short in shown.items():
            key = f"keys/{name}"
            try:
                kf = KeyFile.decode(name, read_key_file(repo.remote, name))
            except NOT_DAMAGE:
                raise
            except NewerObject as exc:  # a host that upgraded added it: not damage
                self.report.warnings.append(f"{exc}; not checked")
            except ChunkvaultError as exc:
                self.problem(key, f"{exc.reason if isinstance(exc, CorruptObject) else exc}: its password opens "
                                  f"nothing; `key remove {short}` removes it (`key add`, with a password that "
                                  "opens, gives that password a key again)")
            else:
                beyond = kf.cost_problem()
                if beyond is not None:  # never derived: nothing opens with it
                    self.problem(key, f"{beyond}: never derived, so nothing opens with it (`key remove` it)")
                    continue
                if kf.repo and kf.repo != repo.config.repo_id:  # copied or planted: harmless, but no key of this one
                    self.report.warnings.append(f"{key}: {repo.key_problem(kf)} (`key remove {short}` removes it)")
                    continue
                readable += 1
        if not readable:
            self.problem("keys", f"no key file of this repository is left: nothing opens it{KEY_IMPORT_HINT}")

    def _load_index(self) -> dict[bytes, EntrySources]:
        """Every pack the (non-superseded) index objects list, with where its entries lie; each delta whose
        base cannot be read, or whose chain is too long, is a problem."""
        repo = self.repo
        strays: list[str] = []
        names = repo.index_names(strays)
        self.report.warnings += [f"unexpected object {key} (no index object is kept under that name)"
                                 for key in strays]
        read = repo.read_index_objects(names, fresh=True)  # the stored copies: a cached one hides their damage
        datas = [(name, got) for name, got in read if isinstance(got, IndexColumns)]
        superseded = superseded_names(got for _, got in datas)
        for name, got in read:
            if isinstance(got, IndexColumns):
                continue
            if isinstance(got, NewerObject) and name not in superseded:
                raise got  # not damage: what it lists is unknown here, and every pack it names would seem lost
            if name in superseded:  # a repair or prune stopped before deleting it: nothing reads it
                self.report.warnings.append(f"index/{name} is superseded and does not read ({got}); "
                                            "`repair index` deletes it")
            else:
                self.problem(f"index/{name}", _said(got, f"index/{name}"))
                self.index_damaged = True
        # Read once: the repository's index is made from the same objects.
        live, self.index = repo.install_index(names, datas, beside_writers=True)
        packs: dict[bytes, EntrySources] = {}
        for d in live:
            for pid, count, start in zip(d.pack_ids, d.counts, d.starts):
                packs.setdefault(pid, []).append((d, count, start))
        self.report.blobs = len(self.index)
        # The deltas' bases, from the bases kept with the index's rows: no object a delta (``deltacheck``).
        where = [(pid, [(d.plain, count, start) for d, count, start in sources]) for pid, sources in packs.items()]
        unreadable = unreadable_marks(self.index, lambda: (s for _, sources in where for s in sources))
        for pid, e, baseless in delta_problems(self.index, where, unreadable, repo.max_delta_depth):
            if baseless:
                p = self.problem(f"blob {e.blob_id.hex()}", _baseless(e.base_id, pid, 0))
                self._baseless.append((p, e.base_id, pid))
                loc = self.index.get(e.blob_id)
                if loc is None or loc.flags == KIND_DELTA:  # no copy stored whole to read instead
                    self.bad_blobs.setdefault(e.blob_id, p)
            else:
                self.bad_blobs.setdefault(e.blob_id, self.problem(
                    f"blob {e.blob_id.hex()}", f"its delta chain is longer than {repo.max_delta_depth}"))
        return packs

    def _load_snapshot(self, name: str) -> Snapshot | ChunkvaultError:
        """The stored snapshot ``name``, or why it does not load; what is no damage (the remote gave up)
        raises.  Called ``OBJECT_READERS`` at a time: one after another, each waited a round trip."""
        try:
            return self.repo.load_snapshot(name, fresh=True)
        except NOT_DAMAGE:
            raise
        except ChunkvaultError as exc:
            return exc

    def _load_snapshots(self) -> list[Snapshot]:
        snaps = []
        newer: set[str] = set()
        damaged: set[str] = set()
        strays: list[str] = []
        names = self.repo.snapshot_names(strays)
        self.report.warnings += [f"unexpected object {key} (no snapshot is kept under that name)" for key in strays]
        for name, loaded in zip(names, parallel_map(self._load_snapshot, names, workers=OBJECT_READERS)):
            if isinstance(loaded, Snapshot):
                snaps.append(loaded)
            elif isinstance(loaded, NewerObject):  # not damage: this version cannot check it
                self.report.warnings.append(f"{loaded}; not checked")
                newer.add(name)
            else:
                self.problem(f"snapshots/{name}", _said(loaded, f"snapshots/{name}")).snapshots.append(name)
                damaged.add(name)
        self.report.snapshots = len(snaps)
        chain_of = self.repo.chains(snaps)
        parents = {s.id: s.parent for s in snaps}
        unreached = broken_chains(parents)  # -> the ancestor not loaded
        resolves = resolving_chains(parents)
        for s in snaps:
            if resolves[s.id]:
                continue  # walked once for all: one chain of 3,000 differentials, walked for each, took 9 s
            try:
                chain_of(s)  # what is wrong with it, as a restore would say
            except NOT_DAMAGE:
                raise
            except ChunkvaultError as exc:
                above = unreached.get(s.id)
                if above in newer:
                    self.report.warnings.append(f"snapshots/{s.id}: built on snapshot {above[:8]}, which a newer "
                                                "chunkvault wrote; not checked")
                    continue
                if above in damaged:  # there, but it does not load: not "missing"
                    exc = f"snapshot {above[:8]} of its chain does not load (see snapshots/{above})"
                self.problem(f"snapshots/{s.id}", f"chain does not resolve: {exc}").snapshots.append(s.id)
        return snaps

    def _check_packs(self, todo: list[PackTask], to_read: int, errors: list[BaseException]) -> None:
        try:
            # One pack in flight per core: the work is CPU-bound (decompress, re-hash) and each
            # thread holds a window of its pack; more threads only add memory.  Headers alone, off local
            # disk, are small reads that wait out a round trip each: more of them at once.
            headers_only = not self.read_data and not self.repo.remote.cheap_ranges
            with ThreadPoolExecutor(max(WORKERS, OBJECT_READERS) if headers_only else WORKERS) as pool:
                for done, _ in enumerate(pool.map(lambda t: self._stop.is_set() or self._check_pack(*t), todo), 1):
                    if self.progress is not None:
                        self.progress(done, self.report.bytes_read, to_read)
        except BaseException as exc:  # re-raised by the caller's thread
            errors.append(exc)

    def _check_packs_forked(self, todo: list[PackTask], to_read: int, snapshots: list[Snapshot]) -> None:
        """The packs shared out to one forked worker per core, while this process walks the manifests.

        Opening, decompressing and re-hashing blobs one by one holds the interpreter lock between native
        calls: with a tree of small files, two threads kept 1.4 cores busy where two processes keep two.
        Each worker returns the problems it found (and which blob each names); they join this report."""
        n = forked.cores()
        shares: list[list[PackTask]] = [[] for _ in range(n)]
        loads = [0] * n
        for task in sorted(todo, key=lambda t: -t[1]):  # largest first, each to the least loaded
            k = loads.index(min(loads))
            shares[k].append(task)
            loads[k] += task[1]
        mark = len(self.report.problems)

        def work(k: int, reporter: forked.Reporter) -> tuple[list[Problem], dict[bytes, int], tuple[int, int, int]]:
            for done, task in enumerate(shares[k], 1):
                self._check_pack(*task)
                reporter.progress((done, self.report.bytes_read))
            found = self.report.problems[mark:]
            at = {id(p): i for i, p in enumerate(found)}
            r = self.report
            return found, {b: at[id(p)] for b, p in self.bad_blobs.items() if id(p) in at}, \
                (r.bytes_read, r.packs_read, r.blobs_read)

        with forked.Workers(n, work) as workers:
            self._check_references(snapshots)
            progress = self.progress
            results = workers.wait(None if progress is None else lambda states: progress(
                sum(s[0] for s in states if s), sum(s[1] for s in states if s), to_read))
        for found, bad, (nbytes, npacks, nblobs) in results:
            with self._lock:
                self.report.problems.extend(found)
            for blob_id, i in bad.items():
                self.bad_blobs[blob_id] = found[i]
            self.report.bytes_read += nbytes
            self.report.packs_read += npacks
            self.report.blobs_read += nblobs
        if self.progress is not None:  # the workers' last states may not have been sent
            self.progress(len(todo), self.report.bytes_read, to_read)

    def _pack_todo(self, indexed: dict[bytes, EntrySources]) -> tuple[list[PackTask], int]:
        """The packs to check (id, size, index entries, whether to read it all) and the bytes to read;
        packs the index lists but the remote lacks are problems, packs no index lists are warnings."""
        repo = self.repo
        stored = {}
        for o in repo.remote.list("data/"):
            pid = pack_id_of(o.key)
            if pid is not None:
                stored[pid] = o.size
            else:
                self.report.warnings.append(f"unexpected object {o.key} (no pack is kept under that name)")
        self.report.packs = len(stored)
        unindexed = stored.keys() - indexed.keys()
        for p, base, pid in self._baseless if unindexed else ():
            p.problem = _baseless(base, pid, len(unindexed))
        for pid in unindexed:
            if stored[pid] < PACK_FIXED_OVERHEAD:
                self.report.warnings.append(f"{pack_key(pid)} is in no index and too short to be a pack "
                                            f"({stored[pid]} bytes): an interrupted copy? prune deletes it")
                continue
            key = pack_key(pid)
            try:
                header = repo.pack_header(key, stored[pid])
            except NOT_DAMAGE:
                raise
            except (ChunkvaultError, ValueError) as exc:  # nothing in it can be found: `repair index` cannot add it
                self.report.warnings.append(f"{key} is in no index, and its header does not read ({exc}): nothing "
                                            "in it can be found (not a pack of this repository?); prune deletes it")
                continue
            if _misnamed_copy(repo, pid, header, stored, indexed):  # `repair index` leaves it out
                self.report.warnings.append(f"{key} is in no index, and its content does not match its name (a copy "
                                            "of another pack under a new name?): nothing needs it; prune deletes it")
                continue
            self.report.warnings.append(
                f"{pack_key(pid)} is in no readable index (an index object is damaged: `repair index` adds it)"
                if self.index_damaged else
                f"{pack_key(pid)} is in no index (a backup, copy or import running now, or one interrupted, "
                "or a prune's new pack whose index it did not get to write, or its index object is lost: "
                "`repair index` adds it; prune deletes it only while no snapshot misses a blob)")
        todo = []
        chosen = (self.select({pid: stored[pid] for pid in indexed if pid in stored})
                  if self.read_data and self.select is not None else None)
        if chosen is not None:
            self.report.packs_chosen = len(chosen)
        for pid, sources in indexed.items():
            if pid not in stored:
                p = self.problem(pack_key(pid), "pack is missing (`repair index` drops it from the index, then "
                                                "`repair snapshots` the files that needed it)")
                for e in _entries(sources):
                    self.bad_blobs[e.blob_id] = p
                continue
            read_all = self.read_data and (chosen is None or pid in chosen)
            todo.append((pid, stored[pid], sources, read_all))
        return todo, sum(size for _, size, _, read_all in todo if read_all)

    def _check_pack(self, pid: bytes, size: int, sources: EntrySources, read_all: bool) -> None:
        """One pack: its header against the index; with ``read_all`` (or when the header does not read)
        every blob opened and re-hashed, and the pack's bytes against its name.  A blob that fails is bad
        alone: the others verified."""
        repo = self.repo
        encoded = _encoded_entries(sources)
        entries: list[PackEntry] | None = None  # decoded only where the header does not hold the same bytes
        key = pack_key(pid)
        window = PACK_READ_WINDOW if repo.remote.cheap_ranges else 1 << 62
        found: list[tuple[bytes, str]] = []
        try:
            fetch, size = self._pack_reader(key, size, read_all)
            try:
                header, body, sealed_header, tail, held = fetch_header(repo.sealer, fetch, size, key,
                                                                       expected=PACK_FIXED_OVERHEAD + len(encoded))
            except CorruptObject as exc:
                # The header or trailer is damaged, not necessarily the blobs: the index says where they lie,
                # and a check without --read-data reads this pack too, to name only what the damage reaches.
                if not read_all:
                    fetch, size = self._pack_reader(key, size, True)
                entries = _entries(sources)
                inside = [e for e in entries if e.offset + e.length <= size]
                found, named = self._read_in_windows(key, pid, fetch, read_windows(inside, size, window), ())
                found += [(e.blob_id, "lies past the pack's end") for e in entries if e.offset + e.length > size]
                self.problem(key, exc.reason if named else _not_its_name(pid))
                header = entries
            else:
                if read_all:
                    found, named = self._read_in_windows(key, pid, fetch, read_windows(header, body, window),
                                                         (sealed_header, tail))
                    if not named:
                        self.problem(key, _not_its_name(pid))
        except NOT_DAMAGE:  # the remote gave up or refused, not the pack: no damage to report, nothing more to read
            raise
        except ChunkvaultError as exc:
            p = self.problem(key, str(exc) if not isinstance(exc, CorruptObject) else exc.reason)
            for e in _entries(sources):
                self.bad_blobs[e.blob_id] = p
            return
        if entries is None and held != encoded:
            entries = _entries(sources)
        if entries is not None and sorted(header) != sorted(entries):
            unheld = set(entries) - set(header)
            p = self.problem(key, f"pack header and index disagree ({len(set(header) - set(entries))} blob(s) its "
                                  f"header lists are not indexed so, {len(unheld)} indexed here are not in its "
                                  f"header): `repair packs {pid.hex()[:12]}` keeps what of it verifies")
            for e in unheld:  # what the index finds here is not here: the files that need it are named
                self.bad_blobs.setdefault(e.blob_id, p)
        for blob_id, problem in found:
            self.bad_blobs[blob_id] = self.problem(f"blob {blob_id.hex()}", f"in {key}: {problem}")

    def _pack_reader(self, key: str, size: int, read_all: bool) -> tuple[Callable[[int, int], bytes | memoryview], int]:
        """Ranged reads of a pack, and its size: from the remote where a range costs no round trip or
        only the header is wanted, else from the whole pack fetched in one request."""
        remote = self.repo.remote
        if not read_all or remote.cheap_ranges:
            return (lambda start, length: remote.get(key, start, length)), size
        whole = memoryview(remote.get(key))
        return (lambda start, length: whole[start : start + length]), len(whole)

    def _read_in_windows(self, key: str, pid: bytes, fetch: Callable[[int, int], bytes | memoryview],
                         windows: list[tuple[int, int, list[PackEntry]]],
                         rest: tuple[bytes | memoryview, ...]) -> tuple[list[tuple[bytes, str]], bool]:
        """Read a pack's body window by window, opening and re-hashing the blobs of each, then hash
        ``rest`` (its header and trailer, already read): every byte once, in order, and a window at a
        time in memory.  The blobs' problems, and whether the pack's bytes are its name's."""
        repo = self.repo
        hasher = blake3.blake3()
        found: list[tuple[bytes, str]] = []
        opened = 0
        read = 0
        for start, end, window in windows:
            view = memoryview(fetch(start, end - start) if end > start else b"")  # blobs opened in place
            read += len(view)
            hasher.update(view)
            for e in window:
                try:
                    plain = repo.read_blob(e.blob_id, verify=True) if e.kind == KIND_DELTA else open_blob(
                        repo.sealer, e.blob_id, view[e.offset - start : e.offset - start + e.length], e.raw_length)
                    if e.kind != KIND_DELTA:
                        repo.check_id(e.blob_id, plain)
                    opened += 1
                except NOT_DAMAGE:
                    raise
                except ChunkvaultError as exc:
                    found.append((e.blob_id, str(exc)))
        for piece in rest:
            hasher.update(piece)
            read += len(piece)
        with self._lock:
            self.report.bytes_read += read
            self.report.packs_read += 1
            self.report.blobs_read += opened
        return found, hasher.digest() == pid

    def _check_references(self, snapshots: list[Snapshot]) -> None:
        index = self.index
        seen: set[tuple] = set()  # manifest segments already checked (shared by similar snapshots)
        for s in snapshots:
            missing = [h for h in s.manifest if bytes.fromhex(h) not in index]
            if missing:
                p = self.problem(f"snapshots/{s.id}", f"{len(missing)} manifest blob(s) not in the index "
                                                      "(`repair index` finds those a pack holds)")
                p.snapshots.append(s.id)
                self.bad_manifests[s.id] = p
                continue
            confinement = Confinement()
            try:
                for _, records in self.repo.manifest_record_runs([s], seen):
                    self._check_records(s, records, confinement)
            except NOT_DAMAGE:
                raise
            except (ChunkvaultError, ValueError) as exc:
                why = (f"every restore refuses its manifest: {exc}" if isinstance(exc, ValueError) else
                       f"manifest unreadable: {exc}" if isinstance(exc, ObjectArchived) else  # nothing damaged
                       (f"manifest unreadable: {exc} (nothing restores it: `repair packs` a damaged pack named "
                        "here first, then `repair snapshots` lists the snapshots to forget)"))
                p = self.problem(f"snapshots/{s.id}", why)
                p.snapshots.append(s.id)
                self.bad_manifests[s.id] = p

    def _check_records(self, snap: Snapshot, records: Iterable[Record], confinement: Confinement,
                       batch: int = 4096) -> None:
        """The chunks of ``records`` (of ``snap``'s own manifest) looked up in the index; with ``read_data``,
        each file's recorded size against the lengths of its chunks, which every restore holds it to (the
        index's lengths are the packs' headers', checked as the packs are read).  Its entries held to what
        every restore holds them to (``Confinement``: ValueError): in order, inside the tree."""
        pending: list[bytes] = []
        for rec in records:
            e = rec.entry
            if e is None:  # a differential's mark of a removal: never restored
                continue
            confinement.check(rec)
            if e.chunks:
                pending.append(e.chunks)
                if len(pending) >= batch:
                    self._report_unindexed(b"".join(pending))
                    pending.clear()
            if self.read_data and e.type == T_FILE and not unread(e):
                self._check_size(snap, rec)
        self._report_unindexed(b"".join(pending))

    def _check_size(self, snap: Snapshot, rec: Record) -> None:
        """A problem naming the file when its chunks hold another length than its entry records."""
        e = rec.entry
        assert e is not None
        index = self.index
        held = 0
        for cid in e.chunk_ids():
            loc = index.get(cid)
            if loc is None:  # not indexed: a problem of its own
                return
            held += loc.raw_length
        if held != e.size:
            path = os.fsdecode(rec.path)
            p = self.problem(f"snapshots/{snap.id}", f"file {path!r} records a size of {e.size} bytes, and its "
                                                     f"chunks hold {held}: no restore of it succeeds")
            p.snapshots.append(snap.id)
            p.files.append(f"{snap.id[:8]}:{path}")

    def _report_unindexed(self, ids: bytes) -> None:
        """Chunk ids (concatenated) looked up in one vectorised call; each one not indexed is a problem."""
        if not ids:
            return
        found = self.index.contains_many(ids)
        i = found.find(0)
        while i >= 0:
            cid = ids[32 * i : 32 * i + 32]
            if cid not in self.bad_blobs:
                self.bad_blobs[cid] = self.problem(f"blob {cid.hex()}", NOT_INDEXED)
            i = found.find(0, i + 1)

    def _bad(self, blob_id: bytes) -> Problem | None:
        """The problem of a blob, or of a base its delta chain needs."""
        p = self.bad_blobs.get(blob_id)
        if p is None:
            p = next((self.bad_blobs[b] for b in self.repo.delta_chain(blob_id) if b in self.bad_blobs), None)
        return p

    def _attribute(self, snapshots: list[Snapshot]) -> None:
        """Name the snapshots and files each bad blob affects.

        A differential needs every manifest of its chain: one whose chain holds a damaged manifest is
        named with that manifest's problem, and only its own records are searched for files."""
        damaged = dict(self.bad_manifests)
        manifest_blobs: dict[str, list[Problem]] = {}  # snapshot -> its manifest's bad blobs' problems
        for s in snapshots:
            for h in s.manifest:
                p = self.bad_blobs.get(bytes.fromhex(h))
                if p is not None:
                    _name(p, s.id)
                    manifest_blobs.setdefault(s.id, []).append(p)
                    damaged.setdefault(s.id, p)
        chain_of = self.repo.chains(snapshots)
        last: dict[int, str] = {}  # problem -> the file it was last found in
        for s in snapshots:
            try:
                chain = chain_of(s)
                broken = [damaged[m.id] for m in chain if m.id in damaged]
                # the blob's problem, as the manifest's, names every differential its chain takes down
                for p in broken + [p for m in chain for p in manifest_blobs.get(m.id, ())]:
                    _name(p, s.id)
                if s.id in damaged:
                    continue
                hit: dict[bytes, list[Problem]] = {}  # path -> the problems of its data (its links share them)
                for rec in self.repo.manifest_records(s) if broken else self.repo.tree(s, snapshots):
                    e = rec.entry
                    if e is not None and e.type == T_HARDLINK and e.target in hit:
                        problems = hit[e.target]
                    elif e is None or not e.chunks:
                        continue
                    else:
                        problems = [p for cid in e.chunk_ids() if (p := self._bad(cid)) is not None]
                        if problems:
                            hit[rec.path] = problems
                    for p in problems:
                        _name(p, s.id)
                        label = f"{s.id[:8]}:{os.fsdecode(rec.path)}"  # its bytes, as os.fsencode gives back
                        if label in p.files or last.get(id(p)) == label:
                            continue
                        last[id(p)] = label  # a file's other bad chunks come next: counted once
                        if len(p.files) < MAX_FILES:
                            p.files.append(label)
                        else:
                            p.more_files += 1
            except NOT_DAMAGE:
                raise
            except ChunkvaultError:
                continue


def _encoded_entries(sources: EntrySources) -> bytes:
    """A pack's index entries as the index encodes them, a pack header's encoding too: a header holding these
    bytes agrees with the index without either decoded (a pack of 100,000 small files' blobs held 100,000
    entries of each, twice the memory of a check)."""
    parts = []
    for d, count, start in sources:
        end, _ = _blobtable.scan_entries(d.plain, start, count)
        parts.append(d.plain[start:end])
    return b"".join(parts)


def _misnamed_copy(repo: Repo, pid: bytes, header: list[PackEntry], stored: Mapping[bytes, int],
                   indexed: Mapping[bytes, EntrySources]) -> bool:
    """Whether a pack no index lists is an indexed pack's copy under another name (a sync tool's, a hand's):
    its header lists the very same blobs at the same places and its bytes do not hash to its name.  Such a
    copy was advised to `repair index`, which leaves it out as such.  Only such look-alikes are read whole."""
    entries = frozenset(header)
    if not any(stored.get(other) == stored[pid] and frozenset(_entries(sources)) == entries
               for other, sources in indexed.items()):
        return False
    return content_name(repo.remote.get(pack_key(pid))) != pid.hex()


def _entries(sources: EntrySources) -> list[PackEntry]:
    """A pack's index entries, decoded from where they lie (the index objects were checked when read)."""
    out: list[PackEntry] = []
    for d, count, start in sources:
        out += decode_entries(d.plain, count, start, "index")[0]
    return out


#: What heals an archived file whose data is lost: no repair can, only its bytes again, or its removal.
_WAL_REMEDY = ("once that blob is out of the index (`repair index` drops a lost pack's, `repair packs` a "
               f"damaged one's), {PUSH_AGAIN}; else `archive-expire --before` a later segment once no recovery "
               "needs it")


def _said(exc: BaseException, key: str) -> str:
    """What a problem with the object ``key`` says of ``exc``: its reason alone where it names that object
    (the problem names it already; a snapshot's error names it "snapshot ID"), else the whole error."""
    named = isinstance(exc, CorruptObject) and key.rsplit("/", 1)[-1] in exc.object_name
    return exc.reason if named else str(exc)


def _not_its_name(pid: bytes) -> str:
    return f"{NOT_ITS_NAME} (`repair packs {pid.hex()[:12]}` keeps what of it still verifies)"


def _name(p: Problem, snapshot_id: str) -> None:
    if snapshot_id not in p.snapshots:
        p.snapshots.append(snapshot_id)


def _baseless(base: bytes, pid: bytes, unindexed: int) -> str:
    """A delta's base that no index lists: while packs no index lists are stored, it may be in one (an
    index object lost), and `repair packs` would drop a delta whose base can be read."""
    if unindexed:
        return (f"its delta base {base.hex()} is in no index, and {unindexed} stored pack(s) are in none: "
                "`repair index` first (the base may be in one of them), then `check` again")
    return (f"its delta base {base.hex()} cannot be read (not in the index, or a delta on one that is not): "
            f"`repair packs {pid.hex()[:12]}` drops it, and the next backup of its data stores it again")
