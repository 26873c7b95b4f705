"""An SFTP version 3 client for the requests the SFTP remote makes, pipelined.

paramiko's ``SFTPClient`` parsed every reply in Python, asked for at most 32 KiB
per read or write, and copied each byte read four or five times on its way
(socket, packet, message, prefetch buffer, file buffer): reading 256 MiB over
OpenSSH on loopback cost it 0.25-0.3 s of CPU in our process, under the
interpreter lock the restore's decoding threads need.  Here requests are as
large as the server says it accepts (OpenSSH's ``limits@openssh.com``:
255 KiB), several in flight, and each reply's data is received in one piece
and joined once.

The channel is anything with ``sendall`` and ``recv``: a socket to an
``ssh -s sftp`` process (whose ``recv`` waits for all it is asked), or a
paramiko channel.
A session serves one request at a time (the remote's pool lends it to one
thread).  Errors follow paramiko's, which the remote sorts: a status of no such
file or permission denied is an ``OSError`` with ``ENOENT`` or ``EACCES``, any
other failure an ``OSError`` without an errno, and a lost or garbled connection
an ``EOFError`` (or the socket's ``ConnectionError``, lost while sending).
Every request's reply is read before an error is raised, so a session that
answered with an error status serves the next request.
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Any

# Packet types (draft-ietf-secsh-filexfer-02, version 3).
_INIT, _VERSION, _OPEN, _CLOSE, _READ, _WRITE, _LSTAT, _FSTAT = 1, 2, 3, 4, 5, 6, 7, 8
_SETSTAT, _OPENDIR, _READDIR, _REMOVE, _MKDIR, _REALPATH, _STAT, _RENAME = 9, 11, 12, 13, 14, 16, 17, 18
_STATUS, _HANDLE, _DATA, _NAME, _ATTRS, _EXTENDED, _EXTENDED_REPLY = 101, 102, 103, 104, 105, 200, 201

_OK, _EOF, _NO_SUCH_FILE, _PERMISSION_DENIED = 0, 1, 2, 3
_READ_FLAG, _WRITE_FLAG, _CREATE_FLAG, _TRUNCATE_FLAG = 0x01, 0x02, 0x08, 0x10

_ATTR_SIZE, _ATTR_UIDGID, _ATTR_PERMISSIONS, _ATTR_ACMODTIME, _ATTR_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000
_ST_RDONLY = 0x1  # statvfs@openssh.com's flag of a file system mounted read-only

# What every server takes (the draft's minimum packet); larger only when the server says so.
DEFAULT_TRANSFER = 32 * 1024
MAX_TRANSFER = 1 << 20
IN_FLIGHT_BYTES = 4 << 20  # requests outstanding per session: about 16 of OpenSSH's 255 KiB
MAX_PACKET = 1 << 26  # a reply's length beyond this is a garbled stream, not a reply

_U32 = struct.Struct(">I")
_HEAD = struct.Struct(">IB")
_HEAD_ID = struct.Struct(">IBI")


class ProtocolError(EOFError):
    """The server's byte stream made no sense: the session cannot go on."""


class StatusError(OSError):
    """The server answered a request with an error status; the session is in step and goes on."""


@dataclass
class Attributes:
    """What a stat or directory listing says of a file (fields the server left out are None)."""

    filename: str = ""
    st_size: int | None = None
    st_mode: int | None = None
    st_mtime: int | None = None


def _string(data: bytes | str) -> bytes:
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return _U32.pack(len(raw)) + raw


class _Reader:
    """Fields of one reply's body, in order."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes):
        self.buf = buf
        self.pos = 0

    def u32(self) -> int:
        return self._unpack(">I", 4)

    def u64(self) -> int:
        return self._unpack(">Q", 8)

    def _unpack(self, fmt: str, size: int) -> int:
        if self.pos + size > len(self.buf):
            raise ProtocolError("SFTP reply ends inside a field")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> bytes:
        n = self.u32()
        if self.pos + n > len(self.buf):
            raise ProtocolError("SFTP reply ends inside a string")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def attributes(self, filename: str = "") -> Attributes:
        flags = self.u32()
        attrs = Attributes(filename)
        if flags & _ATTR_SIZE:
            attrs.st_size = self.u64()
        if flags & _ATTR_UIDGID:
            self.u32(), self.u32()
        if flags & _ATTR_PERMISSIONS:
            attrs.st_mode = self.u32()
        if flags & _ATTR_ACMODTIME:
            self.u32()
            attrs.st_mtime = self.u32()
        if flags & _ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.string(), self.string()
        return attrs


def _status_error(body: bytes) -> StatusError | None:
    """The error a STATUS reply's body (after its id) stands for, None for OK."""
    r = _Reader(body)
    code = r.u32()
    text = r.string().decode(errors="replace") if r.pos < len(body) else ""
    if code == _OK:
        return None
    if code == _NO_SUCH_FILE:
        return StatusError(errno.ENOENT, text or "No such file")
    if code == _PERMISSION_DENIED:
        return StatusError(errno.EACCES, text or "Permission denied")
    return StatusError(text or f"SFTP status {code}")


def _joined(pieces: dict[int, bytes], end: int) -> bytes:
    """The pieces read, by offset, up to ``end``: they must cover it without a gap."""
    parts, at = [], 0
    for offset in sorted(pieces):
        if offset >= end:
            break
        if offset != at:
            raise ProtocolError(f"SFTP reads left bytes {at}-{offset} unanswered")
        piece = pieces[offset]
        parts.append(piece if at + len(piece) <= end else piece[: end - at])
        at += len(parts[-1])
    if at != end:
        raise ProtocolError(f"SFTP reads answered {at} of {end} bytes before the end of the file")
    return parts[0] if len(parts) == 1 else b"".join(parts)


class SFTPClient:
    """One SFTP session on ``sock``; the version exchange happens here."""

    def __init__(self, sock: Any):
        self.sock = sock
        self._next_id = 0
        self._unawaited: set[int] = set()  # closes whose replies nobody waits for
        self._send(_INIT, _U32.pack(3))
        kind, body = self._packet()
        if kind != _VERSION:
            raise ProtocolError(f"SFTP server answered the version request with packet type {kind}")
        r = _Reader(body)
        r.u32()
        self.extensions: dict[bytes, bytes] = {}
        while r.pos < len(body):
            name = r.string()
            self.extensions[name] = r.string()
        self.max_read = self.max_write = DEFAULT_TRANSFER
        if b"limits@openssh.com" in self.extensions:
            self._learn_limits()

    def _learn_limits(self) -> None:
        r = _Reader(self._request(_EXTENDED, _string(b"limits@openssh.com"), _EXTENDED_REPLY))
        max_packet, max_read, max_write = r.u64(), r.u64(), r.u64()
        # A write request carries its handle and offset besides the data: keep 1 KiB for them.
        room = max_packet - 1024 if max_packet > 1024 else MAX_TRANSFER
        if max_read:
            self.max_read = min(max_read, room, MAX_TRANSFER)
        if max_write:
            self.max_write = min(max_write, room, MAX_TRANSFER)

    # -- packets ---------------------------------------------------------------

    def _send(self, kind: int, payload: bytes) -> None:
        self.sock.sendall(_HEAD.pack(len(payload) + 1, kind) + payload)

    def _request_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return self._next_id

    def _send_request(self, kind: int, payload: bytes) -> int:
        rid = self._request_id()
        self._send(kind, _U32.pack(rid) + payload)
        return rid

    def _exact(self, n: int) -> bytes:
        """The next ``n`` bytes from the channel; EOFError if it closes first."""
        parts = []
        while n:
            piece = self.sock.recv(n)
            if not piece:
                raise EOFError("the SFTP connection closed")
            parts.append(piece)
            n -= len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _packet(self) -> tuple[int, bytes]:
        length, kind = _HEAD.unpack(self._exact(_HEAD.size))
        if not 1 <= length <= MAX_PACKET:
            raise ProtocolError(f"SFTP packet of {length} bytes")
        return kind, self._exact(length - 1)

    def _reply_head(self) -> tuple[int, int, int]:
        """(length of the rest, type, request id) of the next reply to a request someone waits for; the
        replies to closes not waited for (``_close_later``) are read and dropped on the way."""
        while True:
            size, kind, rid = _HEAD_ID.unpack(self._exact(_HEAD_ID.size))
            if not 5 <= size <= MAX_PACKET:
                raise ProtocolError(f"SFTP packet of {size} bytes")
            if rid not in self._unawaited:
                return size - 5, kind, rid
            self._unawaited.discard(rid)
            self._exact(size - 5)

    def _reply(self) -> tuple[int, int, bytes]:
        """(type, request id, rest of the body) of the next reply."""
        rest, kind, rid = self._reply_head()
        return kind, rid, self._exact(rest)

    def _request(self, kind: int, payload: bytes, expect: int) -> bytes:
        """Send one request and return the body of its ``expect`` reply; a STATUS reply raises its error
        (or, when ``expect`` is STATUS, an OK status returns)."""
        rid = self._send_request(kind, payload)
        got, reply_id, body = self._reply()
        if reply_id != rid:
            raise ProtocolError(f"SFTP reply to request {reply_id}, expected {rid}")
        if got == expect and expect != _STATUS:
            return body
        if got == _STATUS:
            error = _status_error(body)
            if error is None and expect == _STATUS:
                return body
            raise error or ProtocolError("SFTP status OK where data was expected")
        raise ProtocolError(f"SFTP reply of type {got} where {expect} was expected")

    # -- files and directories ---------------------------------------------------

    def normalize(self, path: str) -> str:
        r = _Reader(self._request(_REALPATH, _string(path), _NAME))
        if r.u32() < 1:
            raise ProtocolError("SFTP realpath named nothing")
        return r.string().decode(errors="surrogateescape")

    def stat(self, path: str) -> Attributes:
        return _Reader(self._request(_STAT, _string(path), _ATTRS)).attributes()

    def lstat(self, path: str) -> Attributes:
        """What ``path`` itself is: a symbolic link is not followed."""
        return _Reader(self._request(_LSTAT, _string(path), _ATTRS)).attributes()

    def set_mtime(self, path: str, mtime: int) -> None:
        """Set ``path``'s modification (and access) time, in whole seconds as SFTP carries them."""
        self._request(_SETSTAT, _string(path) + _U32.pack(_ATTR_ACMODTIME) + _U32.pack(mtime) + _U32.pack(mtime),
                      _STATUS)

    def mkdir(self, path: str, mode: int = 0o700) -> None:
        """Make a directory, by default private to the server's user (as local repositories' are): left to the
        server's umask, every account there could list a repository's objects and copy its key files."""
        self._request(_MKDIR, _string(path) + _U32.pack(_ATTR_PERMISSIONS) + _U32.pack(mode), _STATUS)

    def remove(self, path: str) -> None:
        self._request(_REMOVE, _string(path), _STATUS)

    def rename(self, old: str, new: str) -> None:
        """The standard rename: fails where ``new`` exists."""
        self._request(_RENAME, _string(old) + _string(new), _STATUS)

    def replace(self, old: str, new: str) -> None:
        """Rename replacing ``new``: at once with OpenSSH's ``posix-rename@openssh.com``; on a server without it
        (one that is not OpenSSH's) by the standard rename, and where ``new`` exists, by removing it first,
        as restic does there (a reader may then find no ``new`` for a moment)."""
        if b"posix-rename@openssh.com" in self.extensions:
            self._request(_EXTENDED, _string(b"posix-rename@openssh.com") + _string(old) + _string(new), _STATUS)
            return
        try:
            self.rename(old, new)
            return
        except StatusError as exc:
            failed = exc
        try:  # (version 3 says only "Failure"): ``new`` in the way, and ``old`` there to take its place
            self.stat(new)
            self.stat(old)
        except OSError:
            raise failed from None  # the rename failed for another reason: ``new`` is left as it was
        self.remove(new)
        self.rename(old, new)

    def free_space(self, path: str) -> tuple[int, int, bool] | None:
        """(bytes, inodes) free to the login user on the file system holding ``path``, and whether it is
        mounted read-only, per OpenSSH's ``statvfs@openssh.com``; None where the server does not offer it.
        Version 3 has no status for a full disk or a read-only one (the server says only "Failure"), so a
        failed write asks this to tell them apart."""
        if b"statvfs@openssh.com" not in self.extensions:
            return None
        r = _Reader(self._request(_EXTENDED, _string(b"statvfs@openssh.com") + _string(path), _EXTENDED_REPLY))
        _bsize, frsize, _blocks, _bfree, bavail, _files, _ffree, favail, _fsid, flag = (r.u64() for _ in range(10))
        return frsize * bavail, favail, bool(flag & _ST_RDONLY)

    def listdir_attr(self, path: str) -> list[Attributes]:
        """The entries of directory ``path``, without ``.`` and ``..``."""
        entries = self.listdirs([path])[path]
        if entries is None:
            raise StatusError(errno.ENOENT, f"No such directory: {path}")
        return entries

    def listdirs(self, paths: list[str]) -> dict[str, list[Attributes] | None]:
        """The entries of each directory in ``paths`` (None for one that does not exist), all listed at
        once: a repository's ``data/`` has 256 subdirectories, and listing them one after another took
        11.5 s at 10 ms of round trip (open, read until the end, close: four each), 0.27 s together.
        Any other error is raised once every directory opened has been read or closed."""
        found: dict[str, list[Attributes] | None] = {}
        pending: dict[int, tuple[int, str, bytes]] = {}  # request id -> (OPENDIR or READDIR, path, handle)
        todo = list(reversed(paths))
        window = 64
        error: StatusError | None = None

        def send(kind: int, path: str, handle: bytes) -> None:
            rid = self._send_request(kind, _string(handle if kind != _OPENDIR else path))
            pending[rid] = (kind, path, handle)

        while todo or pending:
            while error is None and todo and len(pending) < window:
                path = todo.pop()
                if path not in found:
                    found[path] = []
                    send(_OPENDIR, path, b"")
            if not pending:
                break
            kind, rid, body = self._reply()
            if rid not in pending:
                raise ProtocolError(f"SFTP reply to request {rid}, which is not in flight")
            request, path, handle = pending.pop(rid)
            failed = _status_error(body) if kind == _STATUS and _U32.unpack_from(body)[0] != _EOF else None
            if request == _OPENDIR:
                if kind == _HANDLE:
                    if error is None:
                        send(_READDIR, path, _Reader(body).string())
                    else:
                        self._close_later(_Reader(body).string())
                elif failed is not None and failed.errno == errno.ENOENT:
                    found[path] = None
                else:
                    error = error or failed or ProtocolError(f"SFTP reply of type {kind} to opening {path}")
            elif request == _READDIR:
                if kind == _NAME:
                    entries = found[path]
                    assert entries is not None  # only a directory that opened is read
                    r = _Reader(body)
                    for _ in range(r.u32()):
                        name = r.string().decode(errors="surrogateescape")
                        r.string()  # the long name, for humans
                        attrs = r.attributes(name)
                        if name not in (".", ".."):
                            entries.append(attrs)
                    if error is None:
                        send(_READDIR, path, handle)
                    else:
                        self._close_later(handle)
                else:
                    if kind != _STATUS:
                        raise ProtocolError(f"SFTP reply of type {kind} while listing {path}")
                    error = error or failed
                    self._close_later(handle)
        if error is not None:
            raise error
        return found

    def _open(self, path: str, flags: int) -> bytes:
        """A handle on ``path``; a file it creates is mode 0600 (the server's umask can only narrow it): left
        to that umask, it was 0644, a key file too, for every account there to copy and guess at offline."""
        attrs = _U32.pack(_ATTR_PERMISSIONS) + _U32.pack(0o600) if flags & _CREATE_FLAG else _U32.pack(0)
        return _Reader(self._request(_OPEN, _string(path) + _U32.pack(flags) + attrs, _HANDLE)).string()

    def _close_handle(self, handle: bytes) -> None:
        self._request(_CLOSE, _string(handle), _STATUS)

    def _close_later(self, handle: bytes) -> None:
        """Close a handle read from without waiting for the answer (a round trip saved per file or
        directory read; what the server says of closing it changes nothing already read)."""
        self._unawaited.add(self._send_request(_CLOSE, _string(handle)))

    def _then_close(self, handle: bytes, work: Any, wait: bool = True) -> Any:
        """``work()``, then the handle closed (``wait``: for the server's answer): also after an error
        status, not after a broken session (where a close would wait for a reply that may never come, or
        read another request's)."""
        close = self._close_handle if wait else self._close_later
        try:
            result = work()
        except StatusError:
            close(handle)
            raise
        close(handle)
        return result

    def write_file(self, path: str, data: bytes | memoryview) -> None:
        """Create or truncate ``path`` and write ``data`` into it, several write requests in flight; then
        have the server flush it to its disk where it can (``fsync@openssh.com``), so a file renamed into
        place after this holds its bytes even if the server's machine goes down."""
        handle = self._open(path, _WRITE_FLAG | _CREATE_FLAG | _TRUNCATE_FLAG)

        def work() -> None:
            self._write(_string(handle), memoryview(data).cast("B"))
            if b"fsync@openssh.com" in self.extensions:
                self._request(_EXTENDED, _string(b"fsync@openssh.com") + _string(handle), _STATUS)

        self._then_close(handle, work)

    def _write(self, handle: bytes, view: memoryview) -> None:
        step = self.max_write
        window = max(1, IN_FLIGHT_BYTES // step)
        pending: set[int] = set()
        error: StatusError | None = None
        pos = 0
        while True:
            while error is None and pos < len(view) and len(pending) < window:
                piece = view[pos : pos + step]
                rid = self._request_id()
                head = _HEAD_ID.pack(1 + 4 + len(handle) + 8 + 4 + len(piece), _WRITE, rid)
                self.sock.sendall(b"".join((head, handle, struct.pack(">QI", pos, len(piece)), piece)))
                pending.add(rid)
                pos += len(piece)
            if not pending:
                break
            kind, rid, body = self._reply()
            if rid not in pending or kind != _STATUS:
                raise ProtocolError(f"SFTP reply of type {kind} to request {rid} while writing")
            pending.discard(rid)
            failed = _status_error(body)
            if failed is not None and error is None:
                error = failed  # the replies still in flight are read before it is raised
        if error is not None:
            raise error

    def read_file(self, path: str, start: int = 0, length: int | None = None) -> bytes:
        """Up to ``length`` bytes of ``path`` from ``start``, fewer only at its end; or, when ``length`` is
        None, all of it from ``start``: as many bytes as the server says the file holds, or an error."""
        handle = self._open(path, _READ_FLAG)

        def work() -> bytes:
            if length is not None:
                return self._read(_string(handle), start, length)
            size = _Reader(self._request(_FSTAT, _string(handle), _ATTRS)).attributes().st_size
            if size is None:
                raise StatusError(f"the SFTP server gave no size for {path}")
            data = self._read(_string(handle), start, max(0, size - start))
            if len(data) < size - start:  # objects never shrink: the server cut the transfer short
                raise ProtocolError(f"the SFTP server ended {path} after {start + len(data)} of its {size} bytes")
            return data

        return self._then_close(handle, work, wait=False)

    def _read(self, handle: bytes, start: int, length: int) -> bytes:
        """Pipelined reads.  A reply shorter than asked (a server's own limit) is followed by a request for
        the rest; an end-of-file status ends the result there."""
        step = self.max_read
        window = max(1, IN_FLIGHT_BYTES // step)
        pending: dict[int, tuple[int, int]] = {}
        todo: list[tuple[int, int]] = []
        pieces: dict[int, bytes] = {}
        end = length
        error: StatusError | None = None
        pos = 0
        while True:
            while error is None and len(pending) < window and (todo or pos < end):
                if todo:
                    at, n = todo.pop()
                else:
                    at, n = pos, min(step, end - pos)
                    pos += n
                if at >= end:
                    continue
                rid = self._send_request(_READ, handle + struct.pack(">QI", start + at, n))
                pending[rid] = (at, n)
            if not pending:
                break
            rest, kind, rid = self._reply_head()
            if rid not in pending:
                raise ProtocolError(f"SFTP reply of type {kind} to request {rid} while reading")
            at, n = pending.pop(rid)
            if kind == _DATA:
                (got,) = _U32.unpack(self._exact(4))
                if got > n or rest != 4 + got:
                    raise ProtocolError(f"SFTP read reply of {got} bytes to a request for {n}")
                if got:
                    pieces[at] = self._exact(got)
                    if got < n:
                        todo.append((at + got, n - got))
                else:
                    end = min(end, at)
                continue
            body = self._exact(rest)
            if kind != _STATUS:
                raise ProtocolError(f"SFTP reply of type {kind} while reading")
            if _U32.unpack_from(body)[0] == _EOF:
                end = min(end, at)
            elif error is None:
                error = _status_error(body)
        if error is not None:
            raise error
        return _joined(pieces, end)

    def close(self) -> None:
        self.sock.close()
