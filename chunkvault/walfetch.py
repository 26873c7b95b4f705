"""The ``restore_command`` of a copy that ``verify-restore --pg-start --pg-recover`` recovers: ask the verifying
process for one archived WAL file over a unix socket.

The server runs as another user (``postgres``) with a scrubbed environment: it must not need the repository's
password, nor cloud credentials, nor even chunkvault.  So this client knows nothing of the repository.  It
opens the file PostgreSQL named (``%p``) itself, as the server's user, passes the descriptor to the relay
(``walrelay``) with the name asked for (``%f``), and exits as PostgreSQL reads a restore_command's status:

* 0: the file was written (its size checked against what the relay says it wrote);
* 1: not archived (PostgreSQL then ends the recovery there: normal at the end of the archive);
* ``FATAL_EXIT`` (above 125): anything else, the relay unreachable, a refusal, a damaged object: PostgreSQL
  takes a status above 125 as fatal and stops, rather than take the file for unarchived and promote short
  of the target (or, with ``end``, promote at the damage and pass).

Standard library only, and runnable as a file (``python3 -I walfetch.py SOCKET %f %p``): the verifying process
copies it next to the socket, for a server user who cannot run the interpreter chunkvault is installed with
(one under /root).  The protocol is shared with ``walrelay``: one SOCK_SEQPACKET message each way, of bounded
size, a request ``GET <name>`` carrying the descriptor (or ``PING``), a reply ``OK <size>``, ``MISSING`` or
``ERROR <why>``.
"""
from __future__ import annotations

import array
import os
import socket
import stat
import sys

PING = b"PING"
GET = b"GET"
#: The longest request: a WAL name is at most 40 characters (a backup history file's).
MAX_REQUEST = 128
#: The longest reply: an error message is cut to fit.
MAX_REPLY = 1024
NOT_ARCHIVED = 1
#: Above 125: PostgreSQL ends the recovery with a fatal error, as for a shell's "command not found".
FATAL_EXIT = 150
#: Seconds the client waits for the relay's answer (a segment from a slow remote included).
ANSWER_WAIT = 3600.0


def encode_request(name: str | None) -> bytes:
    """``GET <name>``, or ``PING`` without a name."""
    return PING if name is None else GET + b" " + name.encode("ascii", "replace")


def parse_reply(data: bytes) -> tuple[str, str]:
    """The relay's status (``OK``, ``MISSING``, ``ERROR``) and what follows it; ``ERROR`` for anything else."""
    if len(data) > MAX_REPLY:
        return "ERROR", f"a reply of {len(data)} bytes, longer than {MAX_REPLY}"
    status, _, rest = data.partition(b" ")
    text = rest.decode("utf-8", "replace")
    if status == b"OK" and (not rest or rest.isdigit()):
        return "OK", text
    if status == b"MISSING" and not rest:
        return "MISSING", ""
    if status == b"ERROR":
        return "ERROR", text or "no reason given"
    return "ERROR", f"an unexpected reply {data[:60]!r}"


def ask(path: str, request: bytes, fds: list[int], timeout: float = ANSWER_WAIT) -> bytes:
    """Send one request (with ``fds``) to the relay at ``path``; its one reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(timeout)
        s.connect(path)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        s.sendmsg([request], ancillary)
        reply = s.recv(MAX_REPLY + 1)
    if not reply:
        raise ConnectionError("the relay closed the connection without an answer")
    return reply


def _say(text: str) -> None:
    """One line on standard error: PostgreSQL's log, where the restore_command's output goes."""
    sys.stderr.write(f"chunkvault walfetch: {text}\n")


def fetch(relay: str, name: str, dest: str) -> int:
    """PostgreSQL's ``%f`` into ``%p`` through the relay; the exit status."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        _say(f"cannot write {dest}: {exc.strerror or exc}")
        return FATAL_EXIT
    try:
        try:
            status, detail = parse_reply(ask(relay, encode_request(name), [fd]))
        except OSError as exc:
            status, detail = "ERROR", f"the relay at {relay} did not answer: {exc.strerror or exc}"
        if status == "OK":
            size = os.fstat(fd).st_size
            if detail and int(detail) == size and stat.S_ISREG(os.fstat(fd).st_mode):
                return 0
            status, detail = "ERROR", f"{dest} holds {size} bytes, the relay wrote {detail or 'none'}"
    finally:
        os.close(fd)
    try:
        os.unlink(dest)  # PostgreSQL takes only a file the command succeeded with; none is left behind
    except OSError:
        pass
    if status == "MISSING":
        return NOT_ARCHIVED
    _say(f"{name}: {detail}")
    return FATAL_EXIT


def ping(relay: str) -> int:
    """Whether the relay answers this user (run before the server starts: a client that cannot reach it would
    fail only once the recovery asks for WAL)."""
    try:
        status, detail = parse_reply(ask(relay, encode_request(None), [], timeout=60.0))
    except OSError as exc:
        _say(f"the relay at {relay} did not answer: {exc.strerror or exc}")
        return FATAL_EXIT
    if status != "OK":
        _say(f"the relay refused a ping: {detail}")
        return FATAL_EXIT
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[1] == "--ping":
        return ping(args[0])
    if len(args) != 3:
        _say("usage: walfetch.py SOCKET %f %p  (or SOCKET --ping)")
        return FATAL_EXIT
    return fetch(*args)


if __name__ == "__main__":
    sys.exit(main())
