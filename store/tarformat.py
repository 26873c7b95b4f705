"""POSIX tar (pax) headers, encoded directly: what ``dump`` writes for a directory.

Python's ``tarfile`` builds each header through several layers of dictionaries and checks: about
100 µs an entry, most of a dump of a tree of small files (5 of 13 s for 48,000 files).  This
encodes the same format in one pass: a ustar header, preceded by a pax extended header when a
field does not fit ustar (a name or link target longer than its field or not ASCII, a size or id
too large, a negative or fractional time) or for extended attributes (``SCHILY.xattr.NAME``
records, as GNU tar and bsdtar write them; POSIX ACLs as ``SCHILY.acl.access`` and ``.default``).  A value that is not UTF-8 is written as its bytes,
under ``hdrcharset=BINARY``.
"""
from __future__ import annotations

import os
import struct
from typing import Mapping

from .posix_acl import ACL_KEYS, GROUP, GROUP_OBJ, MASK, OTHER, USER, USER_OBJ, acl_entries

BLOCK = 512
RECORD = 20 * BLOCK  # an archive ends padded to whole records, as tar writes them
REGULAR, HARD_LINK, SYMLINK, CHAR_DEVICE, BLOCK_DEVICE, DIRECTORY, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
_PAX = b"x"
_PAX_NAME = b"././@PaxHeader"
_HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12s")


def _octal(value: int, width: int) -> bytes:
    """A ustar numeric field holding ``value``, which fits it: octal digits and a NUL."""
    return b"%0*o\0" % (width - 1, value)


def _device(value: int) -> bytes:
    """A device major or minor field: octal, or past its 7 digits base 256 (a leading 0x80 byte), as GNU tar
    writes it and GNU tar, bsdtar and Python's tarfile read it (pax has no record for device numbers that
    GNU tar reads)."""
    if value < 8 ** 7:
        return _octal(value, 8)
    return b"\x80" + value.to_bytes(7, "big")


def _numeric(value: int, width: int, key: bytes, pax: list[bytes]) -> bytes:
    """A ustar numeric field; a value that does not fit it goes to ``pax`` (the field then holds 0)."""
    if 0 <= value < 8 ** (width - 1):
        return _octal(value, width)
    pax.append(record(key, b"%d" % value))
    return _octal(0, width)


def _text(value: bytes, width: int, key: bytes, pax: list[bytes]) -> bytes:
    """A ustar name field; a value longer than it, or not ASCII, goes to ``pax`` (the field keeps a prefix)."""
    if len(value) > width or not value.isascii():
        pax.append(record(key, value))
    return value[:width]


def record(key: bytes, value: bytes) -> bytes:
    """One pax record: ``LENGTH KEY=VALUE\\n``, the length counting its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    digits = len(b"%d" % len(body))
    while len(b"%d" % (len(body) + digits)) != digits:
        digits += 1
    return b"%d" % (len(body) + digits) + body


def is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def exact_time(ns: int) -> bytes:
    """Nanoseconds since the epoch as pax writes a time: exact decimal seconds (a float would be off by
    up to a few hundred ns)."""
    whole, frac = divmod(abs(ns), 1_000_000_000)
    return b"%s%d.%09d" % (b"-" if ns < 0 else b"", whole, frac)


def _block(kind: bytes, name: bytes, mode: bytes, uid: bytes, gid: bytes, size: bytes, mtime: bytes,
           link: bytes = b"", major: bytes = b"", minor: bytes = b"", uname: bytes = b"", gname: bytes = b""
           ) -> bytes:
    """One ustar header block from its encoded fields, with its checksum."""
    block = bytearray(_HEADER.pack(name, mode, uid, gid, size, mtime, b" " * 8, kind, link, b"ustar\0", b"00",
                                   uname, gname, major, minor, b"", b""))
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def header(kind: bytes, name: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0, size: int = 0,
           mtime_ns: int = 0, link: bytes = b"", major: int = 0, minor: int = 0,
           xattrs: dict[bytes, bytes] | None = None,
           names: tuple[Mapping[int, str], Mapping[int, str]] = ({}, {}), real_size: int | None = None) -> bytes:
    """The header blocks of one member (a pax extended header first when needed); a file's data follows,
    padded to a whole block (``padding``). A directory's name gets its trailing slash here.  ``names``:
    the user and group names of ids, which `tar -x` as root sets owners (and ACL entries) by.
    ``real_size``: the member is a sparse file of that size, stored as pax sparse format 1.0 (GNU tar's and
    bsdtar's): ``size`` bytes of its ``sparse_map`` and then its data regions."""
    users, groups = names
    if kind == DIRECTORY and not name.endswith(b"/"):
        name += b"/"
    xattrs = xattrs or {}
    pax: list[bytes] = []
    if real_size is not None:  # a tar that knows no sparse files extracts it as this, the map and data within
        head, _, tail = name.rpartition(b"/")
        name_field = _text(head + b"/" * bool(head) + b"GNUSparseFile.0/" + tail, 100, b"path", pax)
        pax += [record(b"GNU.sparse.major", b"1"), record(b"GNU.sparse.minor", b"0"),
                record(b"GNU.sparse.name", name), record(b"GNU.sparse.realsize", b"%d" % real_size)]
    else:
        name_field = _text(name, 100, b"path", pax)
    link_field = _text(link, 100, b"linkpath", pax)
    seconds, frac = divmod(mtime_ns, 1_000_000_000)
    if frac:
        pax.append(record(b"mtime", exact_time(mtime_ns)))
        seconds = seconds if 0 <= seconds < 8 ** 11 else 0
    # A sparse member's stored size past the field's 11 octal digits is written base 256 (as GNU tar, bsdtar and
    # tarfile read it), not as a size record: tarfile took that record for the file's size (a 20 GiB file came
    # out 9 GiB) and placed the next header by it, past the map (the members after it were lost).
    if real_size is not None and size >= 8 ** 11:
        size_field = b"\x80" + size.to_bytes(11, "big")
    else:
        size_field = _numeric(size, 12, b"size", pax)
    main = _block(kind, name_field, _octal(mode & 0o7777, 8), _numeric(uid, 8, b"uid", pax),
                  _numeric(gid, 8, b"gid", pax), size_field,
                  _numeric(seconds, 12, b"mtime", pax), link_field, _device(major), _device(minor),
                  _text(os.fsencode(users.get(uid, "")), 31, b"uname", pax),
                  _text(os.fsencode(groups.get(gid, "")), 31, b"gname", pax))
    raw = [name, link]  # what goes into the records as it is: the hdrcharset record says when it is not UTF-8
    for key, value in xattrs.items():
        acl = acl_text(value, users, groups) if key in _ACL_KEYS else None
        if acl is not None:  # GNU tar takes ACLs from these records only, and skips them as attributes
            pax.append(record(_ACL_KEYS[key], acl))
        else:  # a keyword ends at its "=": GNU tar writes "%" and "=" in a name as %25 and %3D, and reads them back
            pax.append(record(b"SCHILY.xattr." + key.replace(b"%", b"%25").replace(b"=", b"%3D"), value))
            raw += (key, value)
    if not pax:
        return main
    if not all(is_utf8(v) for v in raw):
        pax.insert(0, record(b"hdrcharset", b"BINARY"))
    records = b"".join(pax)
    extended = _block(_PAX, _PAX_NAME, _octal(0o644, 8), _octal(0, 8), _octal(0, 8), _octal(len(records), 12),
                      _octal(0, 12))
    return extended + records + padding(len(records)) + main


_ACL_KEYS = dict(zip(ACL_KEYS, (b"SCHILY.acl.access", b"SCHILY.acl.default")))  # the attribute -> its pax record
_ACL_WHO = {USER_OBJ: b"user:", GROUP_OBJ: b"group:", MASK: b"mask:", OTHER: b"other:"}


def acl_text(value: bytes, users: Mapping[int, str] | None = None, groups: Mapping[int, str] | None = None
             ) -> bytes | None:
    """A POSIX ACL in Linux's extended attribute form as the short text form (``user::rw-,user:bob:r--,...``,
    as ``acl_from_text`` reads it): a named entry by the name ``users``/``groups`` give its id (GNU tar
    writes names too, and `tar -x --acls` as root maps them as it maps owners), else by number; None for a
    value that is not one."""
    entries = acl_entries(value)
    if entries is None:
        return None
    out = []
    for tag, perm, qualifier in entries:
        if tag in (USER, GROUP):
            name = ((users if tag == USER else groups) or {}).get(qualifier)
            who = (b"user:" if tag == USER else b"group:") + (
                os.fsencode(name) if name and not set(name) & set(":,\n ") else b"%d" % qualifier)
        else:
            who = _ACL_WHO[tag]
        out.append(who + b":" + bytes(b"rwx"[i] if perm & (4 >> i) else ord("-") for i in range(3)))
    return b",".join(out)


def sparse_map(regions: list[tuple[int, int]]) -> bytes:
    """A sparse member's map (pax sparse format 1.0), padded to a whole block: the number of data regions,
    then each one's offset and length, in decimal lines.  A file that ends in a hole ends with a region of
    no bytes at its size, as GNU tar writes it: a tar that reads no realsize still makes it that long."""
    lines = [b"%d\n" % len(regions)] + [b"%d\n%d\n" % region for region in regions]
    text = b"".join(lines)
    return text + padding(len(text))


def padding(size: int) -> bytes:
    """The NULs that fill a member's data of ``size`` bytes to a whole block."""
    return bytes(-size % BLOCK)


def end(written: int) -> bytes:
    """The end of an archive of ``written`` bytes so far: two zero blocks, then zeros to a whole record."""
    return bytes(2 * BLOCK + -(written + 2 * BLOCK) % RECORD)
