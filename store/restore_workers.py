"""Restoring into an empty target with one worker process per core (store/forked.py).

In one process, the writing thread kept one core busy and left the other
half idle, and handing the interpreter lock and chunks between threads was a
seventh of all CPU.  Here the worker processes share out stripes of ``STRIPE_BYTES``
(in tree order, so a worker's reads stay within the same packs; a larger
file is written in parts, cut at its chunks), each stripe taken by whichever
worker gets to it first (``StripeClaims``), while this process makes the
directories, symbolic links and special files, then, once the workers are
done, completes the files written in parts and makes the hard links, and
applies the directories' metadata last.  What a worker could not write
comes back in its result; when the target runs out of space each process
stops, and the files written in parts, none of them completed, are removed.

Where forking is not safe (``forked.can_fork``) the restore runs in this
process as before.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

from . import forked
from .manifest import T_FILE, T_HARDLINK, Entry, Record, entry_record
from .repository import Repo
from .restore import Restorer, RestoreResult, folds_case

STRIPE_BYTES = 16 << 20
# A file larger than a stripe is written in parts, by several workers, only when it is a large share of the
# restore (more than 1/SPLIT_SHARE of its bytes): the kernel serialises writes to one file on its inode's lock,
# so two workers in one file took turns, the waiting one spinning.  On the 2 GB system tree, whose 25 files
# over 16 MiB hold 1.1 GB, that spinning was 6 % of the restore's CPU.  Written whole, a file delays the end
# by at most its own writing time; in parts, one that is most of the restore (a database's table) is still
# decoded by every worker.
SPLIT_SHARE = 8
AUTO_MIN_BYTES = 64 << 20  # below this, forking and decoding the tree once per worker is not worth it
# A worker decodes on one thread beside its writer, 4 MiB ahead: on 2 cores, more threads or a larger window
# made the restore no faster (2.6-2.9 s against 2.5-2.7 s for 2 GB) and each worker 10-20 MiB larger.
WORKER_FETCH_THREADS = 1
WORKER_WINDOW_BYTES = 4 << 20
# A differential's tree is its chain's manifests merged, and each process that walks it pays for all of them
# (24 manifests for a day of hourly database copies: 0.05 s per process, 4 % of that restore).  A tree of up
# to this many entries is resolved once, before forking, and its records are shared with the workers; a
# larger one is walked by every process as it goes: its records held in memory (and copied into each worker
# as their reference counts change) would cost more memory than the merge costs time.
SHARED_TREE_ENTRIES = 20_000


def auto_processes(expected_bytes: int | None) -> int:
    """One worker per core, for a restore big enough to pay for them."""
    if expected_bytes is not None and expected_bytes < AUTO_MIN_BYTES:
        return 1
    return forked.cores()


def restore(restorer: Restorer, tree: Callable[[], Iterator[Record]], processes: int,
            entries: int | None = None, expected_bytes: int | None = None) -> RestoreResult:
    """``restorer.run(tree())``, with ``processes`` workers when the target is empty and forking is safe.
    ``entries``, ``expected_bytes``: how many entries and file bytes the tree holds, where known (see
    SHARED_TREE_ENTRIES and SPLIT_SHARE); the bytes --include selects are counted by a walk of their own."""
    restorer.check_target()
    # A target that takes "doc" for "Doc" (FAT, exFAT) is one process's: a worker writing doc/b made its
    # directory by name, found "Doc", and wrote into it, where the refusal of "doc" was another process's.
    if (processes < 2 or not restorer.fresh or restorer.opt.delta or not isinstance(restorer.repo, Repo)
            or not forked.can_fork(restorer.repo.remote) or folds_case(restorer.root)):
        return _in_this_process(restorer, tree)
    if entries is not None and entries <= SHARED_TREE_ENTRIES:
        records = list(tree())
        tree = lambda: iter(records)  # noqa: E731
    if restorer.selected.includes is not None:  # excludes alone leave most of the snapshot: its bytes do
        expected_bytes = selected_bytes(restorer, tree())
    try:
        result = _Coordinator(restorer, tree, processes, split_above(expected_bytes)).run()
    except forked.WorkersNotStarted as exc:  # under a low limit, before anything was written: one process does it
        restorer.result.warnings.append(f"{exc}; restored in this process instead")
        return _in_this_process(restorer, tree)
    restorer.note_walked()  # this process walked the whole tree: the workers' counts are their stripes'
    result.raise_for_problems()
    return result


def _in_this_process(restorer: Restorer, tree: Callable[[], Iterator[Record]]) -> RestoreResult:
    restorer.restore_records(restorer.selected_records(tree()))
    restorer.note_walked()
    restorer.result.raise_for_problems()
    return restorer.result


def selected_bytes(restorer: Restorer, records: Iterator[Record]) -> int:
    """The file bytes a restore narrowed by includes writes: a file that is most of the selection is
    written in parts even when it is a small share of the snapshot."""
    return sum(rec.entry.size for rec in restorer.selected_records(records)
               if rec.entry is not None and rec.entry.type == T_FILE)


def split_above(expected_bytes: int | None) -> int:
    """The size above which a file is written in parts, for a restore of ``expected_bytes`` (see SPLIT_SHARE)."""
    return STRIPE_BYTES if expected_bytes is None else max(STRIPE_BYTES, expected_bytes // SPLIT_SHARE)


def split(e: Entry, start: int, chunk_length: Callable[[bytes], int | None],
          above: int = STRIPE_BYTES) -> list[tuple[Entry, int]] | None:
    """A file larger than ``above`` (at least a stripe), lying at ``start`` in the restore, cut where its
    chunks cross into another stripe: one entry per part (its chunks, its size) and the part's offset in
    the file.  None for a file restored whole: a smaller one, or one whose chunks the index does not know
    or whose lengths do not add up (its reader reports that)."""
    if e.type != T_FILE or not e.chunks or e.size <= above:
        return None
    cuts: list[tuple[int, int]] = []  # (first chunk, offset)
    offset = 0
    for i, cid in enumerate(e.chunk_ids()):
        n = chunk_length(cid)
        if n is None:
            return None
        if not cuts or (start + cuts[-1][1]) // STRIPE_BYTES != (start + offset) // STRIPE_BYTES:
            cuts.append((i, offset))
        offset += n
    if offset != e.size:
        return None
    ends = cuts[1:] + [(len(e.chunks) // 32, e.size)]
    return [(dataclasses.replace(e, chunks=e.chunks[32 * i:32 * j], size=end - at), at)
            for (i, at), (j, end) in zip(cuts, ends)]


def _placed(records: Iterator[Record], chunk_length: Callable[[bytes], int | None], above: int
            ) -> Iterator[tuple[Record, int, list[tuple[Entry, int]] | None]]:
    """Each record with, for a file, where it starts in the restore (file sizes summed in tree order)
    and its parts (``split``); -1 and None for anything else.  The parent and every worker place
    files through this one walk, so they agree on who writes what."""
    before = 0
    for rec in records:
        e = rec.entry
        if e is None or e.type != T_FILE:
            yield rec, -1, None
            continue
        yield rec, before, split(e, before, chunk_length, above)
        before += e.size


class StripeClaims:
    """Which stripes one worker writes.  Stripes are handed out in order, each to the first worker that asks
    for it or a later one (``take(s)``: the next stripe not yet handed out and at least ``s``, from a counter
    the workers share): one that is done with its stripes takes the next instead of idling.  With every n-th
    stripe fixed per worker, one of two workers ended 0.25-0.45 s before the other in a 5 s restore.

    Every worker walks the same tree and asks, in increasing order, about each stripe something begins in;
    so the stripes a worker passes over when it asks about a later one have nothing beginning in them, and
    the counter skips them in one step (taken one by one, a crafted entry claiming 2**62 bytes had the
    workers count to 2**38)."""

    def __init__(self, take: Callable[[int], int]):
        self._take = take
        self._held = -1

    def mine(self, stripe: int) -> bool:
        if self._held < stripe:
            self._held = self._take(stripe)
        return self._held == stripe


def every_nth(k: int, n: int) -> Callable[[int], int]:
    """``take`` for worker ``k`` of ``n`` where no counter can be shared: the stripes k, k + n, ..."""
    return lambda at_least: at_least + (k - at_least) % n


class _SharedCounter:
    """``take`` shared by forked processes (made before forking): 0, 1, 2, ..., each call skipping to its
    argument if that is further.  OSError where no semaphore can be made (no /dev/shm): each worker then
    takes every n-th stripe."""

    def __init__(self) -> None:
        from multiprocessing import Value  # only a restore in worker processes needs it

        self._value = Value("q", 0)

    def __call__(self, at_least: int = 0) -> int:
        with self._value.get_lock():
            n = max(self._value.value, at_least)
            self._value.value = n + 1
            return n


def _share(records: Iterator[Record], claims: StripeClaims, chunk_length: Callable[[bytes], int | None],
           above: int = STRIPE_BYTES) -> Iterator[tuple[Entry, int | None]]:
    """What the worker holding ``claims`` writes: the files, and the parts of files larger than ``above``
    (with their offsets), that begin in its stripes."""
    for rec, start, parts in _placed(records, chunk_length, above):
        if start < 0:
            continue
        if parts is None:
            if claims.mine(start // STRIPE_BYTES):
                yield rec.entry, None  # type: ignore[misc]
        else:
            for part, offset in parts:
                if claims.mine((start + offset) // STRIPE_BYTES):
                    yield part, offset


class _Coordinator:
    def __init__(self, restorer: Restorer, tree: Callable[[], Iterator[Record]], processes: int, split_above: int):
        self.restorer = restorer
        self.tree = tree
        self.n = processes
        self.split_above = split_above
        try:
            self.stripes: _SharedCounter | None = _SharedCounter()
        except OSError:
            self.stripes = None

    def run(self) -> RestoreResult:
        r = self.restorer
        progress = r.opt.progress
        assert isinstance(r.repo, Repo)
        r.repo.index  # loaded once here and shared, not once per worker: 13 MiB less in all for 2 GB
        links: list[Record] = []
        split_files: list[Entry] = []
        try:
            with forked.Workers(self.n, self._work) as workers:
                r.defer_directories()
                own = self._own(links, split_files)
                r.restore_records(own)
                for _ in own:  # stopped short (no space): every file written in parts is still to be known
                    pass
                results = workers.wait(None if progress is None else lambda states: progress(
                    sum(s[0] for s in states if s), sum(s[1] for s in states if s)))
            self._merge(results)
            self._finish(links, split_files)
        except BaseException:  # interrupted, or a worker failed: a file written in parts is whole only once
            self._remove(split_files)  # every part is and it is finished (the workers remove theirs too)
            raise
        if progress is not None:
            progress(r.result.files, r.result.bytes)
        r.result.processes = self.n
        return r.result

    def _merge(self, results: list[RestoreResult]) -> None:
        """The workers' counts and problems added to this process's; a file written in parts by several of
        them is named once."""
        r = self.restorer.result
        unwritten = set(r.unwritten)
        for res in results:
            r.files += res.files
            r.bytes += res.bytes
            r.warnings.extend(res.warnings)
            r.note_unsupported_xattrs(res.xattrs_unsupported_paths, res.xattrs_unsupported_names,
                                      res.xattrs_unsupported)
            r.note_denied_xattrs(res.xattrs_denied_paths, res.xattrs_denied_names, res.xattrs_denied)
            r.damaged.extend(d for d in res.damaged if d not in r.damaged)
            r.removed.extend(d for d in res.removed if d not in r.removed)
            for u in res.unwritten:
                if u not in unwritten:
                    unwritten.add(u)
                    r.unwritten.append(u)
            if not r.full:
                r.full, r.full_in_place = res.full, res.full_in_place

    def _finish(self, links: list[Record], split_files: list[Entry]) -> None:
        """After the workers: the files they wrote in parts completed (or removed, when a part was not
        written), then the hard links and the directories' metadata; only the removals when the target
        ran out of space, since the restore stops there."""
        r = self.restorer
        broken = {d[0] for d in r.result.damaged} | {u[0] for u in r.result.unwritten}
        for e in split_files:
            if r.result.full or os.fsdecode(e.path) in broken:
                r.remove_quietly(e.path)
            else:
                r.finish_parts(e)
        if not r.result.full:
            r.restore_records(iter(links))
            r.finish_directories()

    def _remove(self, files: list[Entry]) -> None:
        for e in files:
            self.restorer.remove_quietly(e.path)

    def _chunk_length(self, cid: bytes) -> int | None:
        loc = self.restorer.repo.locate(cid)  # type: ignore[union-attr]
        return None if loc is None else loc.raw_length

    def _own(self, links: list[Record], split_files: list[Entry]) -> Iterator[Record]:
        """What this process restores: everything but files; hard links kept for after the workers,
        and the files they write in parts noted, to be completed after them."""
        for rec, start, parts in _placed(self.restorer.selected_records(self.tree()), self._chunk_length,
                                         self.split_above):
            e = rec.entry
            assert e is not None
            if start >= 0:
                if parts is not None:
                    split_files.append(e)
            elif e.type == T_HARDLINK:
                links.append(rec)
            else:
                yield rec

    def _work(self, k: int, reporter: forked.Reporter) -> RestoreResult:
        """Worker ``k``'s share of the files, restored; its counts are its result."""
        r = self.restorer
        r.opt.progress = lambda files, nbytes: reporter.progress((files, nbytes))
        r.opt.fetch_threads = WORKER_FETCH_THREADS
        r.opt.window_bytes = min(r.opt.window_bytes, WORKER_WINDOW_BYTES)
        try:
            r.restore_records(self._mine(k))
        except BaseException:  # stopped (Ctrl-C in the parent, another worker failed): no file written in
            for path in r.parts_written:  # parts is whole yet, and each may be one this worker created
                r.remove_quietly(path)
            raise
        return r.result

    def _mine(self, k: int) -> Iterator[Record]:
        r = self.restorer
        take = self.stripes if self.stripes is not None else every_nth(k, self.n)
        for e, offset in _share(r.selected_records(self.tree()), StripeClaims(take), self._chunk_length,
                                self.split_above):
            if offset is not None:
                r.parts[id(e)] = (e, offset)
            yield entry_record(e)
