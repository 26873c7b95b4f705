"""Which delta entries ``check`` names: those whose base cannot be read, and those whose chain is too long.

Pure logic over the loaded blob index (each delta's base kept with its row) and the index objects' entries,
left where they lie.  A set of every base, a list of every delta's entry and a set of the ids readable took
several hundred bytes a delta (tens of GB for a database's repository of 50 million blobs, most of them
deltas); here one native pass over each pack's entries finds the deltas to look at, and only those are
decoded: none in a sound repository, and a byte a blob more where some base is lost.

A delta reads when some entry of it has a base that reads, as ``pack.readable_ids`` of every entry says:
a blob stored as deltas on two bases (two backups at once, a copy) reads while one of them does, though
the index keeps one copy and its base.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from .blobindex import BlobIndex
from .pack import PackEntry, decode_entries

#: Where some of a pack's entries lie: (an index object's decoded bytes, how many entries, where they start).
Entries = tuple[bytes, int, int]


def unreadable_marks(index: BlobIndex, entries: Callable[[], Iterable[Entries]]) -> bytearray | None:
    """A byte a row of ``index``: 1 at each delta no entry's chain of bases leads from to a blob stored whole;
    None when every delta reads.  ``entries()``: where every pack's entries lie (those ``index`` was made
    from), walked only when the rows' own bases leave some delta unreadable: another copy of it, a delta on
    another base, may read."""
    lost = index.unreadable_deltas()
    if not lost:
        return None
    marks = bytearray(len(index))  # (rows a writer adds meanwhile are past its end: unmarked)
    for blob_id in lost:
        row = index.row(blob_id)
        if row < len(marks):
            marks[row] = 1
    waiting: dict[bytes, list[bytes]] = {}  # base -> the unreadable deltas an entry stores on it
    for buf, count, start in entries():
        for e in _decoded(buf, index.delta_entries(buf, start, count, marks)):
            if _marked(marks, index.row(e.blob_id)):
                waiting.setdefault(e.base_id, []).append(e.blob_id)  # type: ignore[arg-type]
    todo = [base for base in waiting if _reads(index, marks, base)]
    while todo:
        for blob_id in waiting.pop(todo.pop(), ()):
            row = index.row(blob_id)
            if _marked(marks, row):
                marks[row] = 0
                todo.append(blob_id)
    return marks if 1 in marks else None


def delta_problems(index: BlobIndex, packs: Iterable[tuple[bytes, Iterable[Entries]]], marks: bytearray | None,
                   max_depth: int) -> Iterator[tuple[bytes, PackEntry, bool]]:
    """Each delta entry of ``packs`` (pack id, where its entries lie), in their order, that ``check`` names,
    with its pack id: True where its base cannot be read (absent from ``index``, or marked in ``marks``, as
    ``unreadable_marks`` gives them), else False where its blob's chain of bases in ``index`` is longer than
    ``max_depth``.  A blob with two such entries is named for each."""
    depths = bytearray(len(index)) if max_depth < 254 else None  # each chain walked once
    for pid, sources in packs:
        for buf, count, start in sources:
            for e in _decoded(buf, index.delta_entries(buf, start, count, marks, max_depth, depths)):
                if not _reads(index, marks, e.base_id):  # type: ignore[arg-type]
                    yield pid, e, True
                elif index.depth(e.blob_id, max_depth + 1) > max_depth:
                    yield pid, e, False


def _reads(index: BlobIndex, marks: bytearray | None, blob_id: bytes) -> bool:
    row = index.row(blob_id)
    return row >= 0 and not (marks is not None and _marked(marks, row))


def _marked(marks: bytearray, row: int) -> bool:
    return 0 <= row < len(marks) and marks[row] != 0


def _decoded(buf: bytes, positions: list[int]) -> Iterator[PackEntry]:
    for pos in positions:
        yield decode_entries(buf, 1, pos, "index")[0][0]
