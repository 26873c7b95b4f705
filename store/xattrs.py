"""Extended attributes: their encoding in a manifest record, and reading and setting them on disk.

They carry what mode bits cannot: POSIX ACLs (``system.posix_acl_*``), file
capabilities (``security.capability``), SELinux labels and user metadata.
A record holds them as one byte string (store/FORMAT.md, "Manifest stream"):
``(name_len u8 | value_len u32 | name | value)*``, names sorted, so equal
attribute sets encode equally and an entry compares equal to its parent's
when nothing changed.
"""
from __future__ import annotations

import errno
import os
import struct

_PAIR = struct.Struct("<BI")

# Where a file system keeps no extended attributes (or none of a namespace), reading finds none.
UNSUPPORTED_ERRNOS = {errno.ENOTSUP, errno.EOPNOTSUPP}
# Namespaces only a privileged process writes (CAP_SYS_ADMIN for trusted.*, security.* by the security module's
# rules): refused to a restore as another user than root on every entry that has them, a SELinux label on each.
PRIVILEGED = (b"trusted.", b"security.")


def _denied(name: str | bytes, exc: OSError) -> bool:
    """Whether setting or removing ``name`` failed only for want of privilege over its namespace."""
    return exc.errno in (errno.EPERM, errno.EACCES) and os.fsencode(name).startswith(PRIVILEGED)


def encode_xattrs(pairs: dict[bytes, bytes]) -> bytes:
    """The record form of ``pairs`` (name -> value); b"" when there are none."""
    out = []
    for name in sorted(pairs):
        value = pairs[name]
        if not 0 < len(name) < 256:
            raise ValueError(f"extended attribute name of {len(name)} bytes")
        out.append(_PAIR.pack(len(name), len(value)) + name + value)
    return b"".join(out)


def decode_xattrs(raw: bytes | memoryview) -> dict[bytes, bytes]:
    """name -> value of an encoded set; ValueError when malformed."""
    raw = bytes(raw)
    out: dict[bytes, bytes] = {}
    pos = 0
    last = b""
    while pos < len(raw):
        if pos + _PAIR.size > len(raw):
            raise ValueError("extended attributes end inside a header")
        nlen, vlen = _PAIR.unpack_from(raw, pos)
        pos += _PAIR.size
        if not nlen or pos + nlen + vlen > len(raw):
            raise ValueError("extended attribute runs past its record")
        name = raw[pos : pos + nlen]
        if name <= last:
            raise ValueError("extended attribute names out of order")
        out[name] = raw[pos + nlen : pos + nlen + vlen]
        last = name
        pos += nlen + vlen
    return out


def read_xattrs(target: bytes | int) -> bytes:
    """The encoded extended attributes of a path (not followed if a symbolic link) or an open fd.

    A file system without them gives b""; FileNotFoundError passes up (the entry
    vanished); other errors raise OSError for the caller to report.
    """
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in UNSUPPORTED_ERRNOS:
            return b""
        raise
    if not names:
        return b""
    pairs = {}
    for name in names:
        try:
            pairs[os.fsencode(name)] = os.getxattr(target, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno == errno.ENODATA:  # removed between the listing and the read
                continue
            raise
    return encode_xattrs(pairs)


def write_xattrs(target: bytes | int, raw: bytes, replace: bool, follow: bool | None = None,
                 unsupported: list[str] | None = None, denied: list[str] | None = None) -> list[str]:
    """Set the attributes encoded in ``raw`` on a path (not followed, unless ``follow``) or open fd; with
    ``replace``, also remove those it has that ``raw`` lacks.  Returns one line per attribute that could
    not be set; with ``unsupported``, the names the file system keeps none of (ENOTSUP: FAT, exFAT, a
    mount without ACLs) go there instead, and with ``denied``, those of the namespaces this user may not
    write (``PRIVILEGED``: as another user than root, or under a security module's policy), set or
    removed, for the caller to sum up."""
    follow = isinstance(target, int) if follow is None else follow
    try:
        wanted = decode_xattrs(raw) if raw else {}
    except ValueError as exc:
        return [f"recorded malformed ({exc})"]
    failed = []
    if replace:
        try:
            present = [os.fsencode(n) for n in os.listxattr(target, follow_symlinks=follow)]
        except OSError as exc:
            present = []
            if exc.errno not in UNSUPPORTED_ERRNOS:
                failed.append(f"listing: {exc.strerror}")
        for name in present:
            if name not in wanted:
                try:
                    os.removexattr(target, name, follow_symlinks=follow)
                except OSError as exc:
                    if denied is not None and _denied(name, exc):
                        denied.append(os.fsdecode(name))
                    else:
                        failed.append(f"removing {os.fsdecode(name)}: {exc.strerror}")
    for name, value in wanted.items():
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as exc:
            if unsupported is not None and exc.errno in UNSUPPORTED_ERRNOS:
                unsupported.append(os.fsdecode(name))
            elif denied is not None and _denied(name, exc):
                denied.append(os.fsdecode(name))
            else:
                failed.append(f"{os.fsdecode(name)}: {exc.strerror}")
    return failed
