"""What the first page of a WAL segment says about itself, checked against the name it is archived under.

PostgreSQL begins every segment with a long page header: the timeline, the WAL position of the segment's
start, the database system's identifier, the segment size and the WAL block size.  A file pushed under a
segment's name whose header says otherwise (a zeroed or recycled segment, a file renamed or copied into
the wrong place, one cut short) would be replayed by no recovery, and found out only when one stops at it:
``archive-push`` refuses it up front, as pgBackRest does; likewise a segment of another database system than
the segment archived before it (a new ``initdb``, or ``pg_upgrade``, which goes on with the old names).
Pure: bytes in, a header or an error out.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from chunkvault.errors import WalHeaderMismatch

from .walnames import LARGEST_SEGMENT_SIZE, SMALLEST_SEGMENT_SIZE, is_segment, segment_name, segment_number

#: XLogLongPageHeaderData: magic, info, timeline, page address, remaining length, (padding), system
#: identifier, segment size, WAL block size.  PostgreSQL writes it in the server's byte order and alignment:
#: the padding is there where 8-byte integers are aligned to 8 bytes (x86-64, ARM), not where to 4 (32-bit
#: x86).  Neither layout reads the other's as a header: its segment size would be the other's block size.
_LAYOUTS = ("HHIQI4xQII", "HHIQIQII")
HEADER_SIZE = max(struct.calcsize("<" + layout) for layout in _LAYOUTS)  # 40
XLP_LONG_HEADER = 0x0002
_BLOCK_SIZES = {1 << n for n in range(10, 17)}  # XLOG_BLCKSZ: 1 to 64 KiB


@dataclass(frozen=True)
class SegmentHeader:
    timeline: int
    start: int  # the WAL position of the segment's first byte
    system: int  # the database system identifier (initdb's)
    segment_size: int
    block_size: int


def is_checked(name: str) -> bool:
    """Whether a file archived under ``name`` starts with a segment's page header: a segment, whole or cut
    short at a promotion (``.partial``, zero-padded to the whole size); history files are text."""
    return is_segment(name) or name.endswith(".partial") and is_segment(name[:-len(".partial")])


def _decode(head: bytes, layout: str) -> SegmentHeader | None:
    _magic, info, tli, pageaddr, _rem, sysid, seg_size, blcksz = struct.unpack_from(layout, head)
    if not info & XLP_LONG_HEADER or blcksz not in _BLOCK_SIZES or seg_size & (seg_size - 1) or \
            not SMALLEST_SEGMENT_SIZE <= seg_size <= LARGEST_SEGMENT_SIZE:
        return None
    return SegmentHeader(tli, pageaddr, sysid, seg_size, blcksz)


def _header(head: bytes) -> SegmentHeader | None:
    """The long page header ``head`` (HEADER_SIZE bytes) holds, in whichever byte order and layout a server
    writes, or None."""
    for layout in _LAYOUTS:
        for order in "<>":
            if (header := _decode(head, order + layout)) is not None:
                return header
    return None


def check_segment(name: str, head: bytes, size: int) -> SegmentHeader:
    """The header of the segment archived as ``name`` (``is_checked``), read from its first bytes ``head``
    (at least HEADER_SIZE of them, when the file has them) of ``size`` in all; WalHeaderMismatch when they are
    not the start of that segment: no long page header, a size other than the header's, another position,
    or a timeline after the name's (a segment's first pages may be copied from an earlier timeline)."""
    segment = name[:24]
    if size < HEADER_SIZE or len(head) < HEADER_SIZE:
        raise WalHeaderMismatch(f"{name} is {size} bytes, too short for a WAL segment's page header; nothing "
                                "archived")
    header = _header(head)
    if header is None:
        raise WalHeaderMismatch(f"{name} does not start with a WAL segment's page header (a zeroed or recycled "
                                "segment, or not WAL at all?); nothing archived")
    if size != header.segment_size:
        raise WalHeaderMismatch(f"{name} is {size} bytes, but its page header says the server's segments are "
                                f"{header.segment_size} (cut short, or padded?); nothing archived")
    log, seg = int(segment[8:16], 16), int(segment[16:24], 16)
    expected = (log << 32) + seg * header.segment_size
    if seg >= (1 << 32) // header.segment_size or header.start != expected:
        at = f"{header.start >> 32:X}/{header.start & 0xFFFFFFFF:X}"
        raise WalHeaderMismatch(f"{name} holds the WAL at {at}, not that of segment {segment} (a file copied or "
                                "renamed into the wrong place, or a recycled segment?); nothing archived")
    if not 0 < header.timeline <= int(segment[:8], 16):
        raise WalHeaderMismatch(f"{name}'s page header names timeline {header.timeline}, neither the name's "
                                f"{int(segment[:8], 16)} nor an earlier one; nothing archived")
    return header


def previous_segment(name: str, segment_size: int) -> str | None:
    """The segment before ``name``'s on its timeline (segments of ``segment_size``), or None for the first."""
    number = segment_number(name, segment_size)
    return segment_name(int(name[:8], 16), number - 1, segment_size) if number else None


def system_of(head: bytes) -> int | None:
    """The database system a segment's first bytes name, or None where they are no page header (a segment
    archived before these checks could hold anything)."""
    header = _header(head) if len(head) >= HEADER_SIZE else None
    return None if header is None else header.system


def check_same_system(name: str, header: SegmentHeader, earlier: str, earlier_system: int | None) -> None:
    """WalHeaderMismatch when the segment ``earlier``, archived already, is of another database system
    (``earlier_system``; None: unknown) than ``name``'s ``header`` says."""
    if earlier_system is not None and earlier_system != header.system:
        raise WalHeaderMismatch(
            f"{name} is WAL of database system {header.system}, but {earlier}, archived before it, is of system "
            f"{earlier_system}: a repository's WAL archive is one system's (after a new initdb or pg_upgrade, "
            "archive into a new repository, or archive-expire the old system's WAL first); nothing archived")


def check_branch(name: str, header: SegmentHeader, ends: dict[int, int]) -> None:
    """A segment of a later timeline than its first page's (``header.timeline``) must hold the point where
    that timeline ended (``ends``: ``walnames.timeline_ends`` of the name's timeline history file), as the
    segment PostgreSQL copies at a promotion does; WalHeaderMismatch when that timeline ended before the
    segment starts or after it ends: a segment of the old timeline copied under the new one's name (a switch at
    a segment's boundary starts the next one with a page of the new timeline)."""
    end = ends.get(header.timeline)
    if end is not None and not header.start <= end < header.start + header.segment_size:
        raise WalHeaderMismatch(
            f"{name} starts with a page of timeline {header.timeline}, which ended "
            f"{'before' if end < header.start else 'after'} it, at "
            f"{end >> 32:X}/{end & 0xFFFFFFFF:X} ({name[:8]}.history): a segment of timeline {header.timeline} "
            "copied under a later timeline's name?; nothing archived")
