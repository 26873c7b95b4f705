"""Prune and compaction: free the space no snapshot needs.

Marks every blob reachable from the snapshots (manifest blobs, chunks, and
the bases of live deltas all the way down their chains), then deletes packs with no live blob, repacks
packs whose unused share exceeds ``max_unused`` (envelopes move unchanged:
they are sealed to their blob id, not to a pack), and writes one compact
index that supersedes all others.  Order makes every interruption safe, and
frees space before it needs any: packs no index names, index objects that
name only packs to delete and then those packs, new packs, the new index,
then the other deletions — killed at any point, every snapshot restores and
the next prune finishes the job.  Stopped short of the new index (no room, Ctrl-C,
the remote gone), it deletes again what it wrote (``take_back``): a failed prune
leaves the disk no fuller than it found it.
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Iterator, Mapping, Sequence

from chunkvault.errors import (NOT_DAMAGE, ChunkvaultError, CorruptObject, ObjectArchived, ObjectNotFound,
                               RemoteError, RepositoryStateWarning, StorageFull)
from chunkvault.memory import trim_heap
from chunkvault.remotes.layer import parallel_map

from .blob import KIND_DELTA, Plaintext, envelope_base, open_blob, open_envelope
from .blobindex import BlobIndex
from .chain import broken_chains
from .indexfile import INDEX_SLACK, IndexColumns, IndexData, split_index
from .locks import EXCLUSIVE, RepoLock
from .pack import ENTRY_SIZE, EncodedEntries, PackEntry, decode_entries
from .packtable import KeptCopies, PackTable, UsedIds, add_ids, blob_set
from .repository import OBJECT_READERS, PreparedBlob, Repo, pack_key, superseded_names
from .usage import bases_of, with_bases


TEMP_AGE = 3600.0


@dataclass(eq=False)
class PackUse:
    """A pack and what of it is live.  ``entries``: as the index gives them (``EncodedEntries``, decoded when
    read); ``live`` is held for the packs a plan repacks and None for the others, whose live blobs are only
    counted (held for every pack, they were a PackEntry per blob of the repository)."""

    pack_id: bytes
    entries: Sequence[PackEntry]
    live: Sequence[PackEntry] | None
    size: int
    total_bytes: int = -1
    live_bytes: int = -1
    # What the live blobs' entries take in the header of the pack they are moved into.
    live_entry_bytes: int = -1

    def __post_init__(self) -> None:
        if self.total_bytes < 0:
            self.total_bytes = sum(e.length for e in self.entries)
        if self.live is not None and self.live_bytes < 0:
            self.live_bytes = sum(e.length for e in self.live)
            self.live_entry_bytes = sum(ENTRY_SIZE + (len(e.base_id) if e.kind == KIND_DELTA and e.base_id else 0)
                                        for e in self.live)


@dataclass
class PrunePlan:
    delete: list[PackUse] = field(default_factory=list)
    repack: list[PackUse] = field(default_factory=list)
    keep: list[PackUse] = field(default_factory=list)
    # Of ``keep``: packs worth repacking that ``max_repack`` left for a later prune, and how many of them
    # hold more live data than the whole limit (no prune with that limit repacks those).
    held_back: list[PackUse] = field(default_factory=list)
    over_limit: int = 0
    orphans: list[tuple[str, int]] = field(default_factory=list)  # packs in no index: (key, size)
    index_names: list[str] = field(default_factory=list)
    dead_indexes: list[str] = field(default_factory=list)  # index objects naming only packs to delete
    superseded: set[bytes] = field(default_factory=set)  # what the live index objects supersede (carried_forward)
    freed_early: set[bytes] = field(default_factory=set)  # packs that deleting those leaves in no index
    live_blobs: int = 0
    unused_blobs: int = 0
    unfinished_removed: int = 0  # writes killed half-way, an hour old: temp files, S3 multipart uploads
    unfinished_error: str | None = None  # why they could not be listed or removed (the prune went on)

    @property
    def freed_bytes(self) -> int:
        return (sum(p.size for p in self.delete) + sum(p.size - p.live_bytes - p.live_entry_bytes for p in self.repack)
                + sum(size for _, size in self.orphans))

    @property
    def index_unchanged(self) -> bool:
        """Whether the index would come out as it is: one object (none that a stopped prune or repair left
        beside the one superseding it), naming nothing to delete or move."""
        return len(self.index_names) == 1 and not (self.delete or self.repack or self.dead_indexes)

    @property
    def repacked_bytes(self) -> int:
        return sum(p.live_bytes for p in self.repack)

    def to_dict(self) -> dict:
        return {"delete_packs": len(self.delete), "repack_packs": len(self.repack), "keep_packs": len(self.keep),
                "orphan_packs": len(self.orphans), "live_blobs": self.live_blobs,
                "unused_blobs": self.unused_blobs, "freed_bytes": self.freed_bytes,
                "repacked_bytes": self.repacked_bytes, "held_back_packs": len(self.held_back),
                "held_back_over_limit": self.over_limit, "unfinished_removed": self.unfinished_removed,
                "unfinished_error": self.unfinished_error}


class _Either:
    """Membership in any of some blob tables: the used blobs and the bases added to them, without a copy of
    the used (a million ids)."""

    def __init__(self, *sets: BlobIndex | UsedIds | _Either) -> None:
        self.sets = tuple(t for s in sets for t in (s.sets if isinstance(s, _Either) else (s,)))

    def __contains__(self, blob_id: object) -> bool:
        return any(blob_id in s for s in self.sets)


def select_packs(packs: Mapping[bytes, Sequence[PackEntry]], sizes: dict[bytes, int], used: Collection[bytes],
                 max_unused: float, known: KeptCopies | None = None,
                 max_repack: int | None = None) -> PrunePlan:
    """Pure: which packs to delete, repack or keep, given the used blob ids (with the bases of the copies
    ``kept_copies`` chooses).

    A blob stored in several packs (two backups at once may both store it,
    one as a delta and one whole) is live in the copy ``kept_copies`` chooses.
    A kept pack stays indexed whole, its unused blobs and other copies too (a
    later backup may deduplicate against them), so the bases of every delta
    it holds are kept as if used: every blob the new index lists can be read.  ``known``: ``kept_copies(packs)``,
    when the caller has it already.  ``max_repack``: at most that many live bytes are repacked, from the
    packs with the largest unused share on; the others are kept for a later prune (a disk without room to
    repack everything at once is pruned a part at a time).  ``packs`` given as PackEntry lists are first
    held as a ``PackTable`` (and ``known`` chosen for it).
    """
    if not isinstance(packs, PackTable):
        packs, known = PackTable.from_entries(packs), None
    known = KeptCopies(packs) if known is None else known
    in_use = used if isinstance(used, (_Either, BlobIndex, UsedIds)) else blob_set(sorted(used))
    while True:
        plan = _select_once(packs, sizes, in_use, max_unused, known, max_repack)
        needed = {b for use in plan.keep for b in _delta_bases(use.entries) if b not in in_use}
        more = {b for b in with_bases(needed, lambda b: known[b].base_id if b in known and known[b].kind == KIND_DELTA
                                      else None) if b not in in_use}
        if not more:
            return plan
        in_use = _Either(in_use, blob_set(sorted(more)))


def _delta_bases(entries: Sequence[PackEntry]) -> Iterator[bytes]:
    """The base ids the deltas among ``entries`` name (a pack of whole blobs alone is not decoded)."""
    if isinstance(entries, EncodedEntries) and not entries.has_deltas:
        return iter(())
    return (e.base_id for e in entries if e.kind == KIND_DELTA and e.base_id is not None)


def kept_copies(packs: Mapping[bytes, Sequence[PackEntry]], spurned: frozenset[tuple[bytes, int]] = frozenset()
                ) -> Mapping[bytes, PackEntry]:
    """Pure: for each blob, the copy a prune keeps live: the first stored whole (in pack id order), else the
    first delta; a copy ``spurned`` ((pack id, offset): it failed to verify) only where the blob has no
    other.  Marking the bases of one copy while keeping another lost a kept snapshot's data.  For a
    ``PackTable``, a ``KeptCopies`` (compact); else a dict, the reference it follows."""
    if isinstance(packs, PackTable):
        return KeptCopies(packs, spurned)
    copies: dict[bytes, PackEntry] = {}
    rank: dict[bytes, tuple[bool, bool]] = {}
    for pid in sorted(packs):
        for e in packs[pid]:
            this = ((pid, e.offset) in spurned, e.kind == KIND_DELTA)
            if e.blob_id not in copies or this < rank[e.blob_id]:
                copies[e.blob_id], rank[e.blob_id] = e, this
    return copies


def copy_intact(repo: Repo, e: PackEntry, envelope: bytes, *, bases: dict[bytes, Plaintext] | None = None
                ) -> bool:
    """Whether a blob's envelope verifies: it authenticates (sealed to its id, and a delta to its base, by a
    holder of the key) and a whole blob's content hashes to its id.  ``bases`` (base id -> plaintext, those
    that read and hash to their id): a delta's content is checked too, decoded on its base.  Any holder of
    the key can seal bytes to any id, so a copy that is to stand in for one about to be deleted must be
    shown to hold the blob, not only to be sealed."""
    if len(envelope) != e.length:
        return False
    try:
        if e.kind != KIND_DELTA:
            return repo.blob_id(open_blob(repo.sealer, e.blob_id, envelope, e.raw_length)) == e.blob_id
        if bases is None:  # its content needs its base: authentication is the check here
            open_envelope(repo.sealer, e.blob_id, envelope)
            return True
        base = bases.get(envelope_base(envelope) or b"")
        if base is None:
            return False
        return repo.blob_id(open_blob(repo.sealer, e.blob_id, envelope, e.raw_length, base)) == e.blob_id
    except ChunkvaultError:
        return False


def _bases_of(repo: Repo, envelopes: Iterable[bytes]) -> dict[bytes, Plaintext]:
    """The plaintexts of the bases these delta envelopes name that read and hash to their ids: fetched
    together (neighbours in one request), not one request each, and not kept in the cache."""
    wanted = sorted({b for env in envelopes if (b := envelope_base(env)) is not None})
    if not wanted:
        return {}
    try:
        plains = repo.read_blobs(wanted)
    except ChunkvaultError:  # one does not read: each on its own, to keep those that do
        plains = []
        for base_id in wanted:
            try:
                plains.append(repo.read_blob(base_id))
            except ChunkvaultError:
                plains.append(None)
    return {b: p for b, p in zip(wanted, plains) if p is not None and repo.blob_id(p) == b}


#: Copies of one pack read in one request when this close, up to this many bytes: a pack's blobs are read
#: together, not one by one, and a few packs at a time hold no more than a few such runs in memory.
READ_GAP = 1 << 20
READ_RUN = 4 << 20


def _verify_kept(repo: Repo, blob_ids: Iterable[bytes], known: KeptCopies,
                 verified: dict[tuple[bytes, int], bool]) -> None:
    """Read the copy the index keeps (``known``) of each of ``blob_ids`` not read yet, into ``verified`` by
    (pack id, offset): each read once over a prune's rounds."""
    todo: dict[bytes, list[PackEntry]] = {}
    for blob_id in sorted(blob_ids):
        e, pid = known[blob_id], known.pack_of(blob_id)
        if (pid, e.offset) not in verified:
            todo.setdefault(pid, []).append(e)
    verified.update(verify_copies(repo, todo, whole=True))


def _unverified_keeps(repo: Repo, plan: PrunePlan, used: Collection[bytes], known: KeptCopies,
                      verified: dict[tuple[bytes, int], bool]) -> set[tuple[bytes, int]]:
    """The kept copies ((pack id, offset)) that fail to verify, of the used blobs whose other copies the
    plan deletes.  Index entries are trusted until read: a look-alike pack (another's header over other
    bytes, stored by whoever holds the storage) lists the same blobs, and keeping its copy unread while
    deleting the real one lost the data with every check clean.  Only blobs held twice are read, each
    once over the rounds (``verified``), a pack's in few requests and packs in parallel: one request
    per blob, in a row, took minutes where two hosts had backed up the same files at once."""
    dropped = set()
    for use in plan.delete + plan.repack:
        dropped.update(e.blob_id for e in known.others_in(known.packs.numbers[use.pack_id]) if e.blob_id in used)
    _verify_kept(repo, dropped, known, verified)
    failed = set()
    for blob_id in sorted(dropped):
        e = known[blob_id]
        pid = known.pack_of(blob_id)
        if not verified[(pid, e.offset)]:
            warnings.warn(f"blob {blob_id.hex()}: its copy in {pack_key(pid)} does not verify (damaged, or not "
                          "sealed with this repository's key); the prune keeps another copy",
                          RepositoryStateWarning, stacklevel=2)
            failed.add((pid, e.offset))
    return failed


def _deletable_orphans(repo: Repo, orphans: dict[bytes, int], used: Collection[bytes], known: KeptCopies,
                       verified: dict[tuple[bytes, int], bool]) -> list[tuple[str, int]]:
    """The packs in no index that may go: (key, size).  One whose header lists blobs the snapshots use is
    kept, with a warning, unless the copy of each that the index gives verifies: an index object written by
    whoever may only add (a compromised client with an append-only token) could point those blobs at other
    bytes and supersede the objects that listed the real pack, which the next prune then deleted as a
    killed backup's leftover, for good.  Only such orphans' headers and those indexed copies are read."""
    holding: dict[bytes, list[bytes]] = {}
    archived: set[bytes] = set()
    for pid, size in orphans.items():
        try:
            entries = repo.pack_header(pack_key(pid), size)
        except NOT_DAMAGE:  # the remote gave up, or refused access: nothing is known of the pack, which stays
            raise
        except ObjectArchived:  # in an archive storage class (S3's GLACIER): unread, not damaged, it stays
            warnings.warn(f"{pack_key(pid)} is in no index and in an archive storage class, where its header cannot "
                          "be read: kept; once the storage restores it, `repair index` indexes what it holds, or "
                          "a prune deletes it", RepositoryStateWarning, stacklevel=3)
            archived.add(pid)
            continue
        except (ChunkvaultError, ValueError):  # nothing in it can be found: no copy of anything
            continue
        holding[pid] = [e.blob_id for e in entries if e.blob_id in used and e.blob_id in known]
    _verify_kept(repo, {b for ids in holding.values() for b in ids}, known, verified)
    out = []
    for pid, size in orphans.items():
        if pid in archived:
            continue
        bad = [b for b in holding.get(pid, ()) if not verified[(known.pack_of(b), known[b].offset)]]
        if bad:
            warnings.warn(f"{pack_key(pid)} is in no index but holds {len(bad)} blob(s) that snapshots use whose "
                          "indexed copy does not verify (blob " + bad[0].hex() + "): kept; `repair index` indexes "
                          "it again", RepositoryStateWarning, stacklevel=3)
            continue
        out.append((pack_key(pid), size))
    return out


def verify_copies(repo: Repo, copies: dict[bytes, list[PackEntry]], *, whole: bool = False
                  ) -> dict[tuple[bytes, int], bool]:
    """Whether each copy (pack id -> its entries) verifies (``copy_intact``), by (pack id, offset): a pack's
    read in runs of neighbours, a few packs at a time."""
    out: dict[tuple[bytes, int], bool] = {}
    with ThreadPoolExecutor(max(1, min(OBJECT_READERS, len(copies)))) as pool:
        verified = pool.map(lambda pid: _verify_copies(repo, pid, copies[pid], whole), copies)
        for pid, results in zip(copies, verified):
            out.update(((pid, e.offset), ok) for e, ok in results)
    return out


def _verify_copies(repo: Repo, pid: bytes, entries: list[PackEntry], whole: bool) -> list[tuple[PackEntry, bool]]:
    """Whether each of these copies in pack ``pid`` verifies (``copy_intact``), read in runs of neighbours."""
    out: list[tuple[PackEntry, bool]] = []
    run: list[PackEntry] = []
    for e in sorted(entries, key=lambda e: e.offset) + [None]:
        if run and (e is None or e.offset - (run[-1].offset + run[-1].length) > READ_GAP
                    or e.offset + e.length - run[0].offset > READ_RUN):
            start = run[0].offset
            try:
                data = repo.remote.get(pack_key(pid), start, run[-1].offset + run[-1].length - start)
            except ObjectNotFound:
                data = b""
            envelopes = [data[c.offset - start:c.offset - start + c.length] for c in run]
            bases = (_bases_of(repo, (env for c, env in zip(run, envelopes) if c.kind == KIND_DELTA))
                     if whole else None)
            out += [(c, copy_intact(repo, c, env, bases=bases)) for c, env in zip(run, envelopes)]
            run = []
        if e is not None:
            run.append(e)
    return out


def _select_once(packs: PackTable, sizes: dict[bytes, int], used: BlobIndex | UsedIds | _Either,
                 max_unused: float, known: KeptCopies, max_repack: int | None) -> PrunePlan:
    plan = PrunePlan()
    sets = used.sets if isinstance(used, _Either) else (used,)
    for no, pid in enumerate(packs.pack_ids):
        live, total, live_bytes, live_entry_bytes = known.live_in(no, sets)  # no object per entry
        plan.live_blobs += len(live)
        plan.unused_blobs += len(live.entries) - len(live)
        use = PackUse(pid, live.entries, live, sizes.get(pid, 0), total, live_bytes, live_entry_bytes)
        if not live:
            plan.delete.append(use)
        elif use.total_bytes and _unused_share(use) > max_unused:
            plan.repack.append(use)
        else:
            use.live = None
            plan.keep.append(use)
    if max_repack is not None:
        budget = max_repack
        chosen = []
        for use in sorted(plan.repack, key=lambda u: (-_unused_share(u), u.pack_id)):
            if use.live_bytes <= budget:
                budget -= use.live_bytes
                chosen.append(use)
            else:
                use.live = None
                plan.keep.append(use)
                plan.held_back.append(use)
                plan.over_limit += use.live_bytes > max_repack
        plan.repack = sorted(chosen, key=lambda u: u.pack_id)
        plan.keep.sort(key=lambda u: u.pack_id)
    return plan


def _unused_share(use: PackUse) -> float:
    return (use.total_bytes - use.live_bytes) / use.total_bytes


def used_blobs(repo: Repo) -> BlobIndex:
    """Every blob a snapshot needs (manifests and chunks of each snapshot's own manifest) and every blob an
    archived WAL file needs (``wal/``: a push holds the shared lock until its object is written); as a blob
    table, the chunk references going in as the manifests give them (a ``bytes`` each in a set took some
    110 bytes a blob)."""
    used = blob_set()
    for ids in _needed_ids(repo):
        add_ids(used, ids)
    return used


def mark_used(repo: Repo, known: KeptCopies) -> tuple[UsedIds, BlobIndex]:
    """``used_blobs`` marked in the table of the copies kept (a table of their own took 55 bytes a blob), and
    those no index lists, in the order they came."""
    used, missing = UsedIds(known.table), blob_set()
    for ids in _needed_ids(repo):
        add_ids(missing, used.mark(ids))
    return used, missing


def _needed_ids(repo: Repo) -> Iterator[bytes]:
    """The ids ``used_blobs`` holds, packed, some at a time (repeats among them)."""
    from .walarchive import used_blobs as wal_blobs

    # Read again under the lock: a forget's rebase since an earlier listing points a snapshot at new
    # manifest blobs, and a stale object would have them deleted.
    snapshots = repo.reload_snapshots()
    repo.require_readable("prune")  # what an unreadable snapshot needs cannot be known: nothing may go
    broken = broken_chains({s.id: s.parent for s in snapshots})
    if broken:  # a parent object lost for now: what it needs, its differentials need, and it may come back
        sid = min(broken)
        raise CorruptObject(f"snapshots/{sid}", f"a differential on {broken[sid][:8]}, which is missing: prune "
                            "needs every chain whole (`check` names them); forget such snapshots by id first "
                            "if their parents are gone for good")
    yield b"".join(bytes.fromhex(h) for snap in snapshots for h in snap.manifest)
    for _, refs in repo.manifest_chunk_refs(snapshots):
        yield refs
    yield b"".join(sorted(wal_blobs(repo)))


def add_bases(used: set[bytes], known: Mapping[bytes, PackEntry]) -> None:
    """Add the bases of used deltas, and theirs, down every chain: a live delta needs its whole chain."""
    used.update(bases_needed(used, known))


def bases_needed(used: Collection[bytes], known: Mapping[bytes, PackEntry]) -> set[bytes]:
    """The bases of used deltas, and theirs, down every chain, that ``used`` lacks: a live delta needs its
    whole chain.  With ``KeptCopies``, only the deltas kept are looked at, not every used blob."""

    def base_of(b: bytes) -> bytes | None:
        e = known[b]
        if e.kind != KIND_DELTA or e.base_id is None:
            return None
        if e.base_id not in known:
            raise CorruptObject(f"blob {b.hex()}", f"its delta base {e.base_id.hex()} is in no index")
        return e.base_id

    if isinstance(known, KeptCopies):
        starts = {d for d, _ in known.deltas() if d in used}
    else:
        starts = set(used)
    return {b for b in bases_of(starts, base_of) if b not in used}


def indexed_packs(repo: Repo) -> tuple[list[str], dict[bytes, list[PackEntry]], set[bytes]]:
    """The names of the index objects, the entries of every pack the live (not superseded) ones list, and
    what those supersede (``carried_forward``)."""
    names, live = live_index_objects(repo)
    return names, packs_of(live), carried_forward(live.values())


def carried_forward(live: Iterable[IndexData | IndexColumns]) -> set[bytes]:
    """The index objects the live ones supersede: an index that replaces them supersedes these too.  Deleted
    long ago, such an object put back (by whoever holds the storage, or a restore of its old state) would
    otherwise count again, naming packs a prune deleted, and a backup would deduplicate against them."""
    return {s for d in live for s in d.supersedes}


def packs_of(live: dict[str, IndexData]) -> dict[bytes, list[PackEntry]]:
    """The entries of every pack the given index objects list (a pack listed twice: the first listing)."""
    packs: dict[bytes, list[PackEntry]] = {}
    for d in live.values():
        for pid, entries in d.packs.items():
            packs.setdefault(pid, entries)
    return packs


def live_index_columns(repo: Repo) -> tuple[list[str], dict[str, IndexColumns]]:
    """As ``live_index_objects``, the objects' entries left in their bytes (``IndexColumns``): a prune holds
    every entry of the index, a PackEntry each took some 250 bytes."""
    names = repo.index_names()
    read = repo.read_index_objects(names)
    datas = {name: got for name, got in read if isinstance(got, IndexColumns)}
    superseded = superseded_names(datas.values())
    for name, got in read:
        if not isinstance(got, IndexColumns) and name not in superseded:
            raise got
    return names, {name: d for name, d in datas.items() if name not in superseded}


def live_index_objects(repo: Repo) -> tuple[list[str], dict[str, IndexData]]:
    """The names of all index objects, and the contents of the live (not superseded) ones; one that does
    not read stops this unless another supersedes it (a repair or prune stopped before deleting it)."""
    names = repo.index_names()
    datas, failed = read_index_data(repo, names)
    superseded = superseded_names(datas.values())
    for name, exc in failed.items():
        if name not in superseded:
            raise exc
    return names, {name: d for name, d in datas.items() if name not in superseded}


def read_index_data(repo: Repo, names: Iterable[str]) -> tuple[dict[str, IndexData], dict[str, ChunkvaultError]]:
    """The index objects named that read, and why each other does not (damaged, or gone since listed); read
    ``OBJECT_READERS`` at a time: one after another, each waited a round trip."""
    def read(name: str) -> IndexData | CorruptObject | ObjectNotFound:
        try:
            return repo.read_index_object(name)
        except (CorruptObject, ObjectNotFound) as exc:
            return exc

    datas: dict[str, IndexData] = {}
    failed: dict[str, ChunkvaultError] = {}
    names = list(names)
    for name, got in zip(names, parallel_map(read, names, workers=OBJECT_READERS)):
        if isinstance(got, IndexData):
            datas[name] = got
        else:
            failed[name] = got
    return datas, failed


def _pack_ids(d: IndexData | IndexColumns) -> Iterable[bytes]:
    return d.pack_ids if isinstance(d, IndexColumns) else d.packs


def _listings(d: IndexData | IndexColumns) -> Iterator[Sequence[PackEntry]]:
    """Each pack's entries, decoded one pack at a time."""
    if isinstance(d, IndexColumns):
        return (decode_entries(d.plain, count, start, "index")[0] for count, start in zip(d.counts, d.starts))
    return iter(d.packs.values())


def _may_hold_deltas(d: IndexData | IndexColumns) -> bool:
    """False where an object holds no delta (its decoding found none)."""
    return not isinstance(d, IndexColumns) or d.has_deltas


def dead_index_objects(live: Mapping[str, IndexData | IndexColumns], names: Iterable[str],
                       dead_packs: set[bytes]) -> tuple[list[str], set[bytes]]:
    """Pure: the live index objects that name only packs about to be deleted and supersede no index object
    that still exists, and the packs no other live index object names.

    Deleting such an object first leaves its packs in no index, so they can go at once: a prune on a full
    disk (failed backups leave index objects that name only their own packs) frees space before it writes
    the new index.  Killed in between, the packs are orphans the next prune deletes.  An object that holds
    the delta base of a blob the other objects keep listing until the new index replaces them (an unused
    delta in a pack to repack) is not one of them: killed in between, that delta would be indexed with its
    base in no index, and a later backup would deduplicate against it, saving a snapshot that cannot be read.
    """
    existing = {bytes.fromhex(n) for n in names}
    dead = {name for name, d in live.items()
            if not existing.intersection(d.supersedes) and all(pid in dead_packs for pid in _pack_ids(d))}
    while dead:
        # The bases the others name, then which of those they list: no table of every blob they list, and
        # objects without deltas (a decoded object knows) are not decoded at all.
        others = [d for name, d in live.items() if name not in dead]
        bases = {e.base_id for d in others if _may_hold_deltas(d) for entries in _listings(d) for e in entries
                 if e.base_id is not None}
        listed = {e.blob_id for d in others for entries in (_listings(d) if bases else ()) for e in entries
                  if e.blob_id in bases}
        unlisted = bases - listed
        holding = {name for name in dead
                   if any(e.blob_id in unlisted for entries in _listings(live[name]) for e in entries)}
        if not holding:
            break
        dead -= holding  # kept until the new index: then they name what it leaves out, and go with it
    still_named = {pid for name, d in live.items() if name not in dead for pid in _pack_ids(d)}
    freed = {pid for name in dead for pid in _pack_ids(live[name]) if pid not in still_named}
    return [name for name in live if name in dead], freed


@dataclass
class RepackWrites:
    """What a prune (or `repair packs`) stored for its new index before that index replaced the old: the
    new packs, and the index objects naming them written ahead of the one that supersedes the old (the last
    written).  Stopped short, it takes them back (``take_back``): a rerun repacks into new packs anyway, and
    each failed prune on a disk short of room left it fuller, until even a prune a part at a time no longer
    fit."""
    packs: list[bytes] = field(default_factory=list)
    index_names: list[str] = field(default_factory=list)
    # The superseding object was sent and not refused: it may be the live index, naming the new packs.
    committing: bool = False


def take_back(repo: Repo, writes: RepackWrites, ensure_held: Callable[[], None] = lambda: None) -> bool:
    """Delete what a prune stopped short stored: its index objects first, then (only once all of those are
    gone) its packs, each after ``ensure_held`` (a prune whose lock may have gone stale may have had its
    objects read by another, which could rely on them).  Nothing once the superseding object may be stored:
    it may be the live index.  Best effort, stopping at the first failure: True when all is gone.  What is
    left is in no index, or indexed beside the old index whose packs are all still there; the next prune
    removes it (what is in no index first, before it writes anything)."""
    if writes.committing:
        return False
    try:
        for name in reversed(writes.index_names):
            ensure_held()
            repo.remote.delete(f"index/{name}")
        for pack_id in writes.packs:
            ensure_held()
            repo.remote.delete(pack_key(pack_id))
    except ChunkvaultError:
        return False
    return True


def store_envelopes(repo: Repo, blobs: Iterable[PreparedBlob], writes: RepackWrites | None = None) -> IndexData:
    """Envelopes copied unchanged into new packs (they are sealed to their blob id, not to a pack); the
    index of those packs, for the caller to write.  Stopped short, the packs stored are left unindexed and
    noted in ``writes``, for the caller to delete."""
    writer = repo.writer()
    try:
        with writer:
            writer.index_on_close = False
            writer.INDEX_EVERY_PACKS = 1 << 30
            writer.INDEX_EVERY_BYTES = 1 << 62
            writer.INDEX_EVERY_SECONDS = float("inf")
            try:
                for blob in blobs:
                    writer.store(blob)
                writer.flush(write_index=False)
            except BaseException:
                writer.abandon()  # packs not yet sent are not sent
                raise
            return writer.take_index()
    finally:  # after ``close``: every upload has ended
        if writes is not None:
            writes.packs += writer.sent_packs


def superseding_parts(names: Iterable[bytes], limit: int | None) -> list[IndexData]:
    """Index objects of nothing that supersede ``names``, each within a remote's ``limit`` on object size."""
    ordered = sorted(names)
    per_part = (len(ordered) or 1) if limit is None else max(1, (limit - INDEX_SLACK) // 32)
    return [IndexData(supersedes=ordered[i:i + per_part]) for i in range(0, len(ordered), per_part)]


def replace_index(repo: Repo, new_index: IndexData, old_names: list[str],
                  ensure_held: Callable[[], None] = lambda: None, gone: Iterable[bytes] = (),
                  writes: RepackWrites | None = None) -> None:
    """Write ``new_index`` in parts, then delete ``old_names``: the part that supersedes them (and ``gone``,
    index objects deleted before, which must never count again) is written last, so no reader sees a new
    index that is not complete.  ``ensure_held``: before each part and each deletion (a prune that took the
    lock for stale may have deleted the new packs as unindexed).  ``writes`` notes the parts naming packs
    written ahead of the last, and when the last is sent."""
    old = {bytes.fromhex(n) for n in old_names}
    carried = sorted(set(gone) - old)
    limit = repo.remote.max_object_size
    extra: list[IndexData] = []
    if limit is not None and 32 * (len(old) + len(carried)) > limit - INDEX_SLACK:  # in parts of their own, first
        extra, carried = superseding_parts(carried, limit), []
    parts = split_index(IndexData(new_index.packs, sorted(old) + carried), limit)
    ahead = extra + parts[1:]
    for part in ahead:
        ensure_held()
        # Named before it is sent: a lost reply may hide one stored.  Those naming no packs stay, taken
        # back or not: they carry forward the names of index objects deleted before.
        repo.write_index(part, naming=writes.index_names.append if writes is not None and part.packs else None)
    ensure_held()
    if writes is None:
        repo.write_index(parts[0])
    else:
        writes.committing = True
        try:
            repo.write_index(parts[0])
        except StorageFull:  # refused: not stored
            writes.committing = False
            raise
    def delete(name: str) -> None:
        ensure_held()
        repo.remote.delete(f"index/{name}")

    # Superseded by the part just written, in any order: OBJECT_READERS at a time (one after another, each
    # deletion waited a round trip; a prune replacing a year's index objects waited thousands in a row).
    for _ in parallel_map(delete, old_names, workers=OBJECT_READERS):
        pass


def plan_prune(repo: Repo, max_unused: float = 0.05, max_repack: int | None = None) -> PrunePlan:
    names, live = live_index_columns(repo)
    trim_heap()  # what the threads reading the objects let go of, before the index is made
    packs = PackTable.from_columns(live.values())
    # The index objects read once: the repository's index is made of them in pack id order, where each blob's
    # row is the copy kept (``KeptCopies``), and the manifests read through it mark the blobs used in it.
    index = repo.install_packs(names, ((pid, packs.listed[no]) for no, pid in enumerate(packs.pack_ids)))
    known = KeptCopies(packs, table=index, row_packs=[repo.pack_no(p) for p in packs.pack_ids])
    needed, missing = mark_used(repo, known)
    trim_heap()  # and what the threads reading the manifests let go of
    if len(missing):
        first = missing._t.rows(0, 1)[0]
        raise CorruptObject(f"blob {first.hex()}",
                            f"{len(missing)} blob(s) that snapshots need are in no index; before pruning, "
                            "`repair index` finds those a pack still holds, then `repair snapshots` drops "
                            "the files that need the others (`check` names them)")
    sizes = repo.stored_packs()
    lost = [p for p in packs if p not in sizes]
    if lost:
        raise CorruptObject(pack_key(lost[0]), f"{len(lost)} indexed pack(s) are missing; `check` names what "
                                               "they take down, `repair index` drops them from the index")
    spurned: frozenset[tuple[bytes, int]] = frozenset()
    verified: dict[tuple[bytes, int], bool] = {}
    while True:  # each round spurns copies that failed to verify; a blob held in n copies takes n rounds
        bases = blob_set(sorted(bases_needed(needed, known)))
        used = _Either(needed, bases)
        plan = select_packs(packs, sizes, used, max_unused, known, max_repack)
        # Each used blob is live in the one pack its kept copy lies in: one live in none would go with its packs.
        if plan.live_blobs < len(needed) + len(bases):
            raise ChunkvaultError(f"prune found {len(needed) + len(bases) - plan.live_blobs} used blob(s) live in "
                                  "no pack it keeps; nothing was deleted")
        failed = _unverified_keeps(repo, plan, used, known, verified) - spurned
        if not failed:
            break
        spurned |= failed
        # In the one table: the repository's index then reads the copies kept, their bases with them.
        repo.kept_instead(known.spurn(failed, spurned), known.table)
    plan.orphans = _deletable_orphans(repo, {pid: size for pid, size in sizes.items() if pid not in packs},
                                      used, known, verified)
    plan.index_names = names
    plan.dead_indexes, plan.freed_early = dead_index_objects(live, names, {p.pack_id for p in plan.delete})
    plan.superseded = carried_forward(live.values())
    return plan


def execute(repo: Repo, plan: PrunePlan, progress: Callable[[int, int, int], None] | None = None,
            ensure_held: Callable[[], None] = lambda: None) -> None:
    """Carry out ``plan``; ``progress(packs done, bytes repacked, bytes to repack)`` as it goes.
    ``ensure_held`` raises when the lock may have gone stale (a paused prune): then a backup may have
    started meanwhile and deduplicated against what the plan deletes, so nothing more is deleted."""
    repo.require_deletes(pack_key(bytes(32)), "prune")
    repo.require_deletes(f"index/{bytes(32).hex()}", "prune")  # a policy may deny deletes under one folder alone
    done = 0
    if progress is not None:  # the total first, as check's: the work starts here, not with the lock or the plan
        progress(0, 0, plan.repacked_bytes)

    def step(nbytes: int) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, nbytes, plan.repacked_bytes)

    moved = 0
    dead_names = {bytes.fromhex(n) for n in plan.dead_indexes}

    def delete(key: str) -> None:  # each deletion checks the lock: a pause may fall between any two
        ensure_held()
        repo.remote.delete(key)

    # First what no index names (packs of failed or killed backups, unfinished writes):
    # deleting them needs no new index, and frees the space a full disk needs for one.
    for key, _ in plan.orphans:
        delete(key)
        step(moved)
    # Then index objects naming only packs to delete, and the packs that leaves in no index; first an index
    # of nothing that supersedes them and what they superseded: killed before the new index, the next
    # prune carries that forward (``carried_forward``), where their names would have been lost.  On a disk
    # too full for it, they go without: the space is what this step is for.
    marker: list[str] = []
    if plan.dead_indexes:
        try:
            for part in superseding_parts(plan.superseded | dead_names, repo.remote.max_object_size):
                ensure_held()
                marker.append(repo.write_index(part))
        except StorageFull:
            pass
    for name in plan.dead_indexes:
        delete(f"index/{name}")
    for use in plan.delete:
        if use.pack_id in plan.freed_early:
            delete(pack_key(use.pack_id))
            step(moved)
    # The age limit spares any write still in progress.  Best effort: an S3 policy may allow deleting
    # objects but not listing unfinished uploads, an S3-compatible store may not know the request; they are
    # then left to a lifecycle rule, and the prune goes on.
    try:
        plan.unfinished_removed = repo.remote.cleanup_temp(TEMP_AGE)
    except RemoteError as exc:
        plan.unfinished_error = str(exc)
    if plan.index_unchanged:  # written again, it would cost a full disk its room and every client a reread
        return
    new_index = IndexData()
    for use in plan.keep:
        new_index.packs[use.pack_id] = use.entries
    def live_envelopes() -> Iterator[PreparedBlob]:
        nonlocal moved
        for use in plan.repack:
            data = repo.remote.get(pack_key(use.pack_id))
            for e in use.live:
                env = data[e.offset : e.offset + e.length]
                if len(env) != e.length:
                    raise CorruptObject(pack_key(use.pack_id), "truncated pack")
                # Each blob moved is read as a restore would read it: a damaged one was copied into a new pack
                # unchecked and its pack deleted, so `check` then named a pack that was gone, and exit 0.
                if not copy_intact(repo, e, env):
                    raise CorruptObject(f"blob {e.blob_id.hex()}", f"in {pack_key(use.pack_id)}, which the prune was "
                                        "to repack, does not verify; nothing was deleted: `repair packs "
                                        f"{use.pack_id.hex()[:12]}` keeps what of that pack verifies, then prune "
                                        "again")
                yield PreparedBlob(e.blob_id, e.kind, env, e.raw_length, e.base_id)
                moved += e.length
            step(moved)

    # Stopped short of the new index (no room, Ctrl-C, the remote gone), what the repack stored is taken
    # back: the old index and its packs still hold everything, and a rerun repacks into new packs anyway.
    writes = RepackWrites()
    try:
        if plan.repack:
            new_index.packs.update(store_envelopes(repo, live_envelopes(), writes).packs)
        repo.drop_index()  # read again below: the new index is sealed without the old beside it
        ensure_held()
        replace_index(repo, new_index, [n for n in plan.index_names if n not in plan.dead_indexes] + marker,
                      ensure_held, plan.superseded | dead_names, writes)
    except BaseException:
        take_back(repo, writes, ensure_held)
        raise
    del new_index  # the repacked packs' entries, not held beside the index read again below
    for use in plan.delete + plan.repack:
        if use.pack_id not in plan.freed_early:
            delete(pack_key(use.pack_id))
            step(moved)
    repo.load_index()


def _raise_format(repo: Repo) -> None:
    """The config at ``FORMAT_WAL`` where WAL is archived and it is not yet: an append-only token's push could
    not rewrite it, and a chunkvault from before the archive, pruning, would delete the archive's data.  The
    same for a snapshot of version 2 (``FORMAT_XATTRS``) such a token's backup stored: a chunkvault from before
    extended attributes would forget its parent from under it."""
    from .config import FORMAT_WAL, FORMAT_XATTRS
    from .walarchive import names

    if repo.config.format < FORMAT_WAL and names(repo, cache=False):
        repo.raise_format(FORMAT_WAL)
    if repo.config.format < FORMAT_XATTRS and any(s.version >= 2 for s in repo.snapshots()):
        repo.raise_format(FORMAT_XATTRS)


def prune(repo: Repo, *, max_unused: float = 0.05, max_repack: int | None = None, dry_run: bool = False,
          wait: float = 0.0, progress: Callable[[int, int, int], None] | None = None) -> PrunePlan:
    with RepoLock(repo.remote, EXCLUSIVE, "prune", wait=wait) as lock:
        # What backups saved since this process read the index (a forget --prune ran in between) is known
        # only to the index objects listed now: a manifest blob absent from the old index is not damage.
        repo.drop_stale()
        plan = plan_prune(repo, max_unused, max_repack)
        if not dry_run:
            _raise_format(repo)
            try:
                execute(repo, plan, progress, lock.ensure_held)
            except StorageFull as exc:
                if not plan.repack:
                    raise
                raise StorageFull(f"{exc} (repacking needs room for what it keeps; `prune --max-unused 100%` "
                                  "first deletes only what it can without repacking, and `--max-repack-size` "
                                  "repacks a part at a time)") from None
    return plan
