"""The SFTP client against OpenSSH's own ``sftp-server``, directly over pipes.

A relay between the two can rewrite the server's replies, for what OpenSSH
never does on its own: replies cut short, an error status in the middle of a
pipelined read or write, a garbled reply, no ``limits@openssh.com``.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
import threading
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkvault.remotes.sftp_client import DEFAULT_TRANSFER, ProtocolError, SFTPClient, StatusError

SFTP_SERVER = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                                "/usr/libexec/sftp-server", shutil.which("sftp-server") or "")
                    if p and os.access(p, os.X_OK)), None)

if SFTP_SERVER is None:
    if os.environ.get("CI"):
        raise RuntimeError("OpenSSH's sftp-server is missing (install openssh-server)")
    pytest.skip("no sftp-server binary", allow_module_level=True)

DATA, STATUS, VERSION, EXTENDED, WRITE, CLOSE, OPENDIR, NAME = 103, 101, 2, 200, 6, 4, 11, 104
Rewrite = Callable[[int, bytes], list[bytes]]


def packet(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


def status(request_id: int, code: int, text: bytes = b"injected") -> bytes:
    return packet(STATUS, struct.pack(">III", request_id, code, len(text)) + text + b"\0\0\0\0")


class Relay:
    """``sftp-server`` on pipes, and a socket for the client; each server packet goes through ``rewrite``
    (type, body) -> the packets to pass on."""

    def __init__(self, rewrite: Rewrite | None = None):
        self.rewrite = rewrite or (lambda kind, body: [packet(kind, body)])
        self.requests: list[tuple[int, bytes | None]] = []
        self.proc = subprocess.Popen([SFTP_SERVER, "-e", "-l", "QUIET"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self._ours, self.client_end = socket.socketpair()
        self._threads = [threading.Thread(target=self._up, daemon=True),
                         threading.Thread(target=self._down, daemon=True)]
        for t in self._threads:
            t.start()

    def _up(self) -> None:
        pending = b""
        try:
            while chunk := self._ours.recv(1 << 16):
                pending = self._note_requests(pending + chunk)  # before the server can answer them
                self.proc.stdin.write(chunk)
                self.proc.stdin.flush()
        except OSError:  # either end closed
            pass
        finally:
            try:
                self.proc.stdin.close()
            except OSError:  # what was still buffered for a server that is gone
                pass

    def _note_requests(self, stream: bytes) -> bytes:
        """Record the type of each whole request in ``stream`` (and an extended one's name); the rest."""
        while len(stream) >= 5:
            length, kind = struct.unpack_from(">IB", stream)
            if len(stream) < 4 + length:
                break
            name = None
            if kind == EXTENDED:
                (n,) = struct.unpack_from(">I", stream, 9)
                name = stream[13 : 13 + n]
            self.requests.append((kind, name))
            stream = stream[4 + length :]
        return stream

    def _down(self) -> None:
        out = self.proc.stdout
        try:
            while len(head := out.read(5)) == 5:
                length, kind = struct.unpack(">IB", head)
                body = out.read(length - 1)
                for p in self.rewrite(kind, body):
                    self._ours.sendall(p)
        except OSError:
            pass
        finally:
            self._hang_up()

    def _hang_up(self) -> None:
        """End the client's connection (a shutdown also wakes the thread blocked reading it)."""
        try:
            self._ours.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._ours.close()

    def close(self) -> None:
        self.client_end.close()
        self._hang_up()
        self.proc.kill()  # it may be blocked writing replies nobody reads any more
        self.proc.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=10)
        self.proc.stdout.close()


@pytest.fixture
def relay():
    made: list[Relay] = []

    def start(rewrite: Rewrite | None = None) -> SFTPClient:
        r = Relay(rewrite)
        made.append(r)
        client = SFTPClient(r.client_end)
        client.relay = r
        return client

    yield start
    for r in made:
        r.close()


def cut_data_replies(most: int) -> Rewrite:
    """A server that returns at most ``most`` bytes per read, whatever its limits said."""
    def rewrite(kind: int, body: bytes) -> list[bytes]:
        if kind == DATA:
            rid, n = struct.unpack_from(">II", body)
            if n > most:
                body = struct.pack(">II", rid, most) + body[8 : 8 + most]
        return [packet(kind, body)]
    return rewrite


def renaming_extension(old: bytes, new: bytes) -> Rewrite:
    """A server that does not offer extension ``old`` (it is announced as ``new``)."""
    def rewrite(kind: int, body: bytes) -> list[bytes]:
        if kind == VERSION:
            body = body.replace(old, new)
        return [packet(kind, body)]
    return rewrite


def test_files_and_directories_round_trip(relay, tmp_path):
    c = relay()
    assert c.max_read == c.max_write == 261120  # what OpenSSH's limits@openssh.com says
    d = str(tmp_path / "d")
    c.mkdir(d)
    data = os.urandom((5 << 20) + 12_345)
    c.write_file(f"{d}/a", data)
    assert (tmp_path / "d" / "a").read_bytes() == data
    assert c.read_file(f"{d}/a") == data
    for start, length in [(0, 1), (1, 261120), (261119, 261122), (5 << 20, 1 << 20), (len(data), 10), (len(data) + 5, 3)]:
        assert c.read_file(f"{d}/a", start, length) == data[start : start + length]
    assert c.stat(f"{d}/a").st_size == len(data)
    c.write_file(f"{d}/b", b"")
    assert c.read_file(f"{d}/b") == b""
    assert sorted((a.filename, a.st_size) for a in c.listdir_attr(d)) == [("a", len(data)), ("b", 0)]
    with pytest.raises(OSError):
        c.rename(f"{d}/b", f"{d}/a")  # the standard rename never replaces
    c.replace(f"{d}/b", f"{d}/a")
    assert c.read_file(f"{d}/a") == b"" and not (tmp_path / "d" / "b").exists()
    c.remove(f"{d}/a")
    with pytest.raises(OSError) as missing:
        c.stat(f"{d}/a")
    assert missing.value.errno == errno.ENOENT
    assert c.listdir_attr(d) == []
    assert c.normalize(d + "/.") == d


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 600_000), cut=st.integers(1_000, 70_000),
       ranges=st.lists(st.tuples(st.integers(0, 650_000), st.one_of(st.none(), st.integers(0, 650_000))),
                       min_size=1, max_size=6))
def test_replies_cut_short_are_completed(relay, tmp_path, size, cut, ranges):
    path = tmp_path / f"f{size}"
    data = os.urandom(size)
    path.write_bytes(data)
    c = relay(cut_data_replies(cut))
    for start, length in ranges:
        end = size if length is None else start + length
        assert c.read_file(str(path), start, length) == data[start:end]


def test_without_limits_requests_stay_small(relay, tmp_path):
    c = relay(renaming_extension(b"limits@openssh.com", b"limits@example.org"))
    assert c.max_read == c.max_write == DEFAULT_TRANSFER
    data = os.urandom(300_000)
    c.write_file(str(tmp_path / "x"), data)
    assert c.read_file(str(tmp_path / "x")) == data


def fail_nth(kind_wanted: int, n: int) -> Rewrite:
    """Turn the ``n``-th reply of ``kind_wanted`` into a failure status for the same request."""
    seen = [0]

    def rewrite(kind: int, body: bytes) -> list[bytes]:
        if kind == kind_wanted:
            seen[0] += 1
            if seen[0] == n:
                return [status(struct.unpack_from(">I", body)[0], 4)]
        return [packet(kind, body)]
    return rewrite


def test_an_error_in_the_middle_of_a_read_leaves_the_session_in_step(relay, tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "x").write_bytes(data)
    c = relay(fail_nth(DATA, 3))
    with pytest.raises(StatusError, match="injected"):
        c.read_file(str(tmp_path / "x"))
    assert c.read_file(str(tmp_path / "x")) == data  # every reply of the failed read was taken in


def test_an_error_in_the_middle_of_a_write_leaves_the_session_in_step(relay, tmp_path):
    data = os.urandom(3 << 20)
    c = relay(fail_nth(STATUS, 4))  # the fourth write's (the OPEN is answered with a handle)
    with pytest.raises(StatusError, match="injected"):
        c.write_file(str(tmp_path / "x"), data)
    c.write_file(str(tmp_path / "y"), data)
    assert (tmp_path / "y").read_bytes() == data


def test_a_reply_to_no_request_is_a_protocol_error(relay, tmp_path):
    (tmp_path / "x").write_bytes(os.urandom(1 << 20))

    def wrong_id(kind: int, body: bytes) -> list[bytes]:
        if kind == DATA:
            body = struct.pack(">I", 0xDEAD) + body[4:]
        return [packet(kind, body)]

    c = relay(wrong_id)
    with pytest.raises(ProtocolError):
        c.read_file(str(tmp_path / "x"))


def test_a_connection_that_ends_mid_reply_is_an_eof(relay, tmp_path):
    (tmp_path / "x").write_bytes(os.urandom(1 << 20))

    def cut(kind: int, body: bytes) -> list[bytes]:
        if kind == DATA:
            raise OSError("cut")  # the relay stops: the client sees its socket close
        return [packet(kind, body)]

    c = relay(cut)
    with pytest.raises((EOFError, ConnectionError)):  # reading the reply, or still sending requests
        c.read_file(str(tmp_path / "x"))


def test_a_written_file_is_flushed_on_the_server_before_it_is_closed(relay, tmp_path):
    c = relay()
    c.write_file(str(tmp_path / "x"), os.urandom(600_000))
    kinds = [k for k, _ in c.relay.requests]
    fsync = c.relay.requests.index((EXTENDED, b"fsync@openssh.com"))
    assert kinds[fsync - 1] == WRITE and kinds[fsync + 1] == CLOSE
    plain = relay(renaming_extension(b"fsync@openssh.com", b"fsync@example.org"))  # a server without it
    plain.write_file(str(tmp_path / "y"), b"data")
    assert all(name is None or b"fsync" not in name for _, name in plain.relay.requests)
    assert (tmp_path / "y").read_bytes() == b"data"


def test_names_that_are_not_utf8_round_trip(relay, tmp_path):
    c = relay()
    name = os.fsdecode(b"caf\xe9")
    c.write_file(str(tmp_path / name), b"x")
    assert os.listdir(os.fsencode(tmp_path)) == [b"caf\xe9"]
    assert [a.filename for a in c.listdir_attr(str(tmp_path))] == [name]


def test_many_directories_are_listed_at_once(relay, tmp_path):
    tree = {f"d{i:02x}": [f"f{j}" for j in range(i * 7)] for i in range(40)}  # up to 273 names: several reads
    for d, names in tree.items():
        (tmp_path / d).mkdir()
        for n in names:
            (tmp_path / d / n).write_bytes(b"x" * len(n))
    c = relay()
    paths = [str(tmp_path / d) for d in tree] + [str(tmp_path / "missing")]
    got = c.listdirs(paths)
    assert got[str(tmp_path / "missing")] is None
    for d, names in tree.items():
        assert sorted((a.filename, a.st_size) for a in got[str(tmp_path / d)]) == sorted((n, len(n)) for n in names)
    opened = [k for k, _ in c.relay.requests].index(OPENDIR)
    assert [k for k, _ in c.relay.requests][opened : opened + 41] == [OPENDIR] * 41  # all asked before any reply
    with pytest.raises(OSError) as missing:
        c.listdir_attr(str(tmp_path / "missing"))
    assert missing.value.errno == errno.ENOENT


def test_an_error_while_listing_leaves_the_session_in_step(relay, tmp_path):
    for i in range(10):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "f").write_bytes(b"x")
    c = relay(fail_nth(NAME, 4))
    paths = [str(tmp_path / f"d{i}") for i in range(10)]
    with pytest.raises(StatusError, match="injected"):
        c.listdirs(paths)
    assert all(len(entries) == 1 for entries in c.listdirs(paths).values())
    c.stat(str(tmp_path))  # answered after every request before it: the relay has seen them all
    closes = sum(1 for k, _ in c.relay.requests if k == CLOSE)
    assert closes == 20  # every directory opened was closed, the failed listing's too


def test_files_and_directories_read_are_closed_without_waiting(relay, tmp_path):
    """A read's close is sent at once and its answer read with the next reply: one round trip less per
    file or directory read, and the session stays in step (a write's close is still waited for)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    c = relay()
    for _ in range(3):
        assert c.read_file(str(tmp_path / "d" / "f")) == b"abc"
        assert [a.filename for a in c.listdir_attr(str(tmp_path / "d"))] == ["f"]
        assert c.read_file(str(tmp_path / "d" / "f"), 1, 1) == b"b"  # the reply skipped is a READ's neighbour
    assert c._unawaited  # the last close's answer is still on its way, or unread
    c.write_file(str(tmp_path / "d" / "g"), b"x")
    assert c.stat(str(tmp_path / "d" / "g")).st_size == 1
    assert not c._unawaited
    assert sum(1 for k, _ in c.relay.requests if k == CLOSE) == 10


def test_a_whole_file_ended_early_is_an_error_and_a_range_is_what_there_is(relay, tmp_path):
    """The remote tells the retry layer it needs no stat after a whole read: the read itself checks the
    bytes against the size the open file reports."""
    data = os.urandom(1 << 20)
    (tmp_path / "x").write_bytes(data)
    seen = [0]

    def early_end(kind: int, body: bytes) -> list[bytes]:
        if kind == DATA:
            seen[0] += 1
            if seen[0] == 2:
                return [status(struct.unpack_from(">I", body)[0], 1, b"end of file")]
        return [packet(kind, body)]

    c = relay(early_end)
    with pytest.raises(ProtocolError, match="after"):
        c.read_file(str(tmp_path / "x"))
    assert c.read_file(str(tmp_path / "x"), len(data) - 10, 100) == data[-10:]


def test_free_space_is_what_the_servers_file_system_says(relay, tmp_path):
    c = relay()
    free_bytes, free_inodes, read_only = c.free_space(str(tmp_path))
    st = os.statvfs(tmp_path)
    assert abs(free_bytes - st.f_frsize * st.f_bavail) <= 64 << 20  # other writers come and go meanwhile
    assert free_inodes > 0 and read_only == bool(st.f_flag & os.ST_RDONLY)
    with pytest.raises(StatusError) as info:
        c.free_space(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT
    assert relay(renaming_extension(b"statvfs@openssh.com", b"statvfs@example.org")).free_space(str(tmp_path)) is None


def test_replace_on_a_server_without_posix_rename(relay, tmp_path):
    """Not every SSH server is OpenSSH's: without its posix-rename, every write that replaced an object (a
    lock's refresh) failed, so nothing but init worked.  The standard rename does, removing what is in the
    way first."""
    c = relay(renaming_extension(b"posix-rename@openssh.com", b"posix-renamX@openssh.com"))
    d = str(tmp_path)
    c.write_file(f"{d}/new", b"one")
    c.replace(f"{d}/new", f"{d}/obj")  # nothing there
    c.write_file(f"{d}/new", b"two")
    c.replace(f"{d}/new", f"{d}/obj")  # replaced
    assert (tmp_path / "obj").read_bytes() == b"two" and not (tmp_path / "new").exists()
    with pytest.raises(OSError):
        c.replace(f"{d}/absent", f"{d}/obj")  # the rename's own failure, the object left as it was
    assert (tmp_path / "obj").read_bytes() == b"two"


_HANDLE = 102  # SSH_FXP_HANDLE: the reply that opens a file or a directory


def _refusing_handle(nth: int, code: int):
    """A relay rewrite: the ``nth`` handle reply (0: every one) becomes a status ``code`` (3: permission
    denied)."""
    seen = [0]

    def rewrite(kind: int, body: bytes) -> list[bytes]:
        if kind == _HANDLE:
            seen[0] += 1
            if nth in (0, seen[0]):
                return [status(struct.unpack_from(">I", body)[0], code, b"Permission denied")]
        return [packet(kind, body)]
    return rewrite


def test_a_directory_the_server_refuses_to_open_is_an_error_not_missing(relay, tmp_path):
    """Taken for missing, an unreadable data/xx/ was left out of the listing: check, prune and repair saw a
    repository without its packs."""
    for i in range(3):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "pack").write_bytes(b"x")
    client = relay(_refusing_handle(2, 3))
    with pytest.raises(OSError) as info:
        client.listdirs([str(tmp_path / f"d{i}") for i in range(3)])
    assert info.value.errno == errno.EACCES


def test_permission_denied_carries_its_errno(relay, tmp_path):
    """What the remote turns into PermissionDenied (its own exit code), not a generic failure."""
    (tmp_path / "f").write_bytes(b"x")
    client = relay(_refusing_handle(0, 3))
    with pytest.raises(OSError) as info:
        client.read_file(str(tmp_path / "f"))
    assert info.value.errno == errno.EACCES
