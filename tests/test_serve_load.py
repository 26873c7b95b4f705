"""``chunkvault serve`` as the service many hosts push to: many clients at once, a prune among them,
append-only clients crafting requests, and clients that misbehave, with the service's threads, open files
and memory watched while they do."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from conftest import PASSWORD
from servers_http import APPEND_TOKEN, FULL_TOKEN, READ_TOKEN, serve_factory, write_tokens  # noqa: F401
from treeutil import describe


def _files(root: Path) -> dict[str, bytes]:
    """Every object under the served directory and its digest (the reserve aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".reserve"}


def _usage(pid: int) -> tuple[int, int, int]:
    """The service's threads, open files and resident memory (KiB)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["Threads"]), len(os.listdir(f"/proc/{pid}/fd")), int(status["VmRSS"].split()[0])


def _wait_for(what: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(0.1)
    return what()


def _request(port: int, head: str, body: bytes = b"", *, source: str = "127.0.0.1") -> bytes:
    """One raw request (nothing normalised on the way) and what the service answers until it closes."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while piece := s.recv(65536):
                answer += piece
        except OSError:
            pass
        return answer


def _put_head(key: str, length: int, token: str = FULL_TOKEN, extra: str = "") -> str:
    return (f"PUT /objects/{key} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {length}{extra}")


def _head(s: socket.socket) -> bytes:
    """One answer's status line and headers (its body, if any, left unread)."""
    head = b""
    while b"\r\n\r\n" not in head:
        piece = s.recv(1)
        if not piece:
            break
        head += piece
    return head


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


# --- many clients into one repository ------------------------------------------------------------


def _tree(root: Path, seed: int) -> Path:
    root.mkdir(parents=True)
    rnd = random.Random(seed)
    for i in range(6):
        (root / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 250_000)))
    (root / "shared").write_bytes(random.Random(0).randbytes(400_000))  # deduplicated across every tree
    return root


@pytest.mark.slow
def test_many_clients_back_up_at_once_while_others_read_and_a_prune_takes_its_turn(serve_factory, tmp_path):
    """Eight append-only clients back up four trees (two per tree) into one repository at once while
    read-only clients list and check; then a full client forgets two trees' snapshots and prunes while
    backups of one of them keep starting.  The prune is not starved, no backup fails, and every
    snapshot restores byte for byte and reads clean: nothing was deduplicated against data the prune
    removed."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)), "--quiet")
    url = server.url

    def run(*args: str, token: str, cache: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
        env.update(CHUNKVAULT_PASSWORD=PASSWORD, CHUNKVAULT_HTTP_TOKEN=token,
                   CHUNKVAULT_CACHE_DIR=str(tmp_path / f"cache-{cache}"))
        return subprocess.Popen([sys.executable, "-m", "chunkvault.cli", *args, "-r", url], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def done(proc: subprocess.Popen, timeout: float = 120) -> str:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(proc.args[3:5])} exited {proc.returncode}:\n{err}"
        return out

    done(run("init", "--kdf-time", "0", "--pack-size", "200k", token=FULL_TOKEN, cache="admin"))
    trees = [_tree(tmp_path / f"src{t}", t) for t in range(4)]
    backups = [run("backup", str(trees[i % 4]), "--host", f"h{i}", token=APPEND_TOKEN, cache=f"h{i}")
               for i in range(8)]
    time.sleep(1)  # the readers meet the backups under way
    readers = [run("snapshots", "--json", token=READ_TOKEN, cache="r0"),
               run("check", token=READ_TOKEN, cache="r1")]
    for proc in backups + readers:
        done(proc)

    listed = json.loads(done(run("snapshots", "--json", token=FULL_TOKEN, cache="admin")))
    gone = [s["id"] for s in listed if s["host"] in ("h0", "h4", "h1", "h5")]  # trees 0 and 1
    assert len(gone) == 4
    done(run("forget", *gone, token=FULL_TOKEN, cache="admin"))

    stop = threading.Event()
    looped: list[tuple[int, str]] = []

    def again(k: int) -> None:  # tree 0, whose data is now in no snapshot, backed up again and again
        while not stop.is_set():
            proc = run("backup", str(trees[0]), "--host", f"again{k}", token=APPEND_TOKEN, cache=f"again{k}")
            out, err = proc.communicate(timeout=120)
            looped.append((proc.returncode, err))

    loops = [threading.Thread(target=again, args=(k,)) for k in range(3)]
    for loop in loops:
        loop.start()
    try:
        time.sleep(0.5)  # the first backups are under way, deduplicating against tree 0's data
        started = time.monotonic()
        pruned = run("prune", "--max-unused", "0", "--wait", "60", "--json", token=FULL_TOKEN, cache="admin")
        counts = json.loads(done(pruned, timeout=90))
        assert counts["delete_packs"] + counts["repack_packs"] > 0, counts  # tree 1's data went
        assert time.monotonic() - started < 60
        count = len(looped)
        assert _wait_for(lambda: len(looped) > count, 60), "backups go on after the prune"
    finally:
        stop.set()
        for loop in loops:
            loop.join(180)
    assert [code for code, _ in looped] == [0] * len(looped), [err for code, err in looped if code]

    snapshots = json.loads(done(run("snapshots", "--json", token=READ_TOKEN, cache="r0")))
    assert len(snapshots) == 4 + len(looped)
    done(run("check", "--read-data", token=READ_TOKEN, cache="r0"))

    def restored(snapshot: dict) -> bool:
        target = tmp_path / "out" / snapshot["id"]
        done(run("restore", snapshot["id"], "--target", str(target), token=READ_TOKEN, cache=snapshot["id"]))
        return describe(target) == describe(snapshot["paths"][0])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(restored, snapshots))


def test_a_prune_held_off_by_backups_starting_in_turn_says_how_many_held_it(serve_factory, tmp_path, cli):
    """Backups that keep starting, each before the last ends, never leave a waiting prune the repository:
    it gives up after its --wait with one line that says how many commands held it in turn, not only the
    last one, which looked like a single hung backup."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)), "--quiet")
    env = {"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache")}
    cli("init", "-r", server.url, "--kdf-time", "0", env=env)
    stop = threading.Event()

    def backups_in_turn() -> None:  # live shared locks of this process, each replaced by the next
        previous = None
        while not stop.is_set():
            key = f"locks/{os.urandom(16).hex()}"
            body = json.dumps({"kind": "shared", "host": socket.gethostname(), "pid": os.getpid(),
                               "purpose": "backup", "time": time.time()}).encode()
            _request(server.port, _put_head(key, len(body)), body)
            if previous:
                _request(server.port, f"DELETE /objects/{previous} HTTP/1.1\r\nHost: x\r\n"
                                      f"Authorization: Bearer {FULL_TOKEN}")
            previous = key
            stop.wait(0.3)

    turns = threading.Thread(target=backups_in_turn)
    turns.start()
    try:
        refused = cli("prune", "-r", server.url, "--wait", "2", env=env, check=15).stderr.decode()
    finally:
        stop.set()
        turns.join()
    line = refused.strip().splitlines()[-1]
    assert "is locked by backup" in line and "waited 2 s, in which" in line, refused
    assert int(line.split("in which ")[1].split()[0]) >= 2


# --- append-only clients crafting requests -------------------------------------------------------


CRAFTED = [
    "PUT /objects/snapshots/%61aaa",  # an escaped letter
    "PUT /objects/snapshots/aaaa?overwrite=1",
    "PUT //objects/snapshots/aaaa",
    "PUT /objects/snapshots/./aaaa",
    "PUT /objects/snapshots//aaaa",
    "PUT /objects/index/../snapshots/aaaa",
    "PUT /objects/locks/..%2fsnapshots%2faaaa",
    "PUT /objects/locks/%2e%2e/snapshots/aaaa",
    "PUT /objects/locks/%252e%252e/snapshots/aaaa",  # escaped twice
    "PUT /objects/locks/%c0%ae%c0%ae/snapshots/aaaa",  # overlong UTF-8 dots
    "PUT /objects/locks\\..\\snapshots\\aaaa",
    "PUT /objects/locks/..%5csnapshots%5caaaa",
    "PUT /objects/data/ab/../../snapshots/aaaa",
    "PUT /objects/data/AB/abab",
    "PUT /objects/data/ab/abab%00",
    "PUT /objects/data/ab/abab%20",
    "PUT /objects/DATA/ab/abab",
    "PUT /objects/config",
    "PUT /objects/keys/key1",
    "PUT /objects/locks/x-held",  # another command's exclusive lock
    "PUT http://127.0.0.1/objects/snapshots/aaaa",  # an absolute URI
    "DELETE /objects/snapshots/aaaa",
    "DELETE /objects/snapshots/%61aaa",
    "DELETE /objects/data/ab/abab",
    "DELETE /objects/locks/../snapshots/aaaa",
    "DELETE /objects/locks/%2e%2e%2fconfig",
    "DELETE /objects/config",
    "DELETE /objects/keys/key1",
    "DELETE /objects/index/idx1",
    "DELETE /objects/locks/x-held",  # a prune's lock: the backups it holds off would read what it deletes
    "DELETE /objects/locks/x-%68eld",
]


def test_an_append_only_client_crafting_requests_replaces_and_removes_nothing_of_what_is_stored(
        serve_factory, tmp_path):
    """Whatever the spelling of the name, an append-only token neither replaces nor deletes an object that
    is not its own lock, nor reaches a file beside the objects."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)))
    stored = {"config": b"c", "keys/key1": b"k", "snapshots/aaaa": b"s", "index/idx1": b"i",
              "data/ab/abab": b"p", "locks/x-held": b"x"}
    for key, data in stored.items():
        assert _status(_request(server.port, _put_head(key, len(data)), data)) == 201
    (server.path / "tokens").write_bytes(b"full a-token-beside-the-objects\n")
    before = _files(server.path)
    for line in CRAFTED:
        method, target = line.split(" ", 1)
        body = b"EVIL" if method == "PUT" else b""
        head = (f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {APPEND_TOKEN}"
                + (f"\r\nContent-Length: {len(body)}" if body else ""))
        status = _status(_request(server.port, head, body))
        assert status in (400, 403, 404, 405), f"{line}: {status}"
        assert _files(server.path) == before, line
    # its own (shared) locks it may replace and remove, and it may read the others' locks
    lock = b'{"kind": "shared"}'
    assert _status(_request(server.port, _put_head("locks/mine", len(lock), APPEND_TOKEN), lock)) == 201
    assert _status(_request(server.port, f"GET /objects/locks/x-held HTTP/1.1\r\nHost: x\r\n"
                                         f"Authorization: Bearer {APPEND_TOKEN}")) == 200
    assert _status(_request(server.port, f"DELETE /objects/locks/mine HTTP/1.1\r\nHost: x\r\n"
                                         f"Authorization: Bearer {APPEND_TOKEN}")) == 204
    assert _files(server.path) == before
    assert "EVIL" not in "".join(p.read_text(errors="replace") for p in server.path.rglob("*") if p.is_file())


def test_a_stale_exclusive_lock_an_append_only_client_cannot_remove_holds_off_no_backup(
        serve_factory, tmp_path, cli):
    """A prune killed outright leaves its exclusive lock; the append-only backups that meet it once it is
    stale pass it over, and only a full token's unlock removes it."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)))
    url = server.url
    full = {"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache-full")}
    appender = {"CHUNKVAULT_HTTP_TOKEN": APPEND_TOKEN, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache-app")}
    cli("init", "-r", url, "--kdf-time", "0", env=full)
    lock = {"kind": "exclusive", "host": "elsewhere", "pid": 4242, "purpose": "prune", "time": time.time() - 900}
    body = json.dumps(lock).encode()
    assert _status(_request(server.port, _put_head("locks/x-" + "a" * 32, len(body)), body)) == 201
    stale = time.time() - 900
    os.utime(server.path / "locks" / ("x-" + "a" * 32), (stale, stale))
    cli("backup", "-r", url, str(_tree(tmp_path / "src", 1)), "--wait", "5", env=appender)
    assert (server.path / "locks" / ("x-" + "a" * 32)).exists()
    refused = cli("unlock", "-r", url, env=appender, check=False)
    assert (server.path / "locks" / ("x-" + "a" * 32)).exists()
    assert "Traceback" not in refused.stderr.decode()
    cli("unlock", "-r", url, env=full)
    assert not list((server.path / "locks").iterdir())


# --- what a request leaves in the log ------------------------------------------------------------


def test_a_body_longer_than_declared_stores_what_was_declared_and_its_rest_is_no_request_of_the_last_key(
        serve_factory, tmp_path):
    """The bytes past the declared length are read as the next request on the connection: refused as
    malformed, and logged as such, not under the key the request before it named."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)))
    answer = _request(server.port, _put_head("data/ab/abcd", 5), b"helloEXTRA BYTES\r\n\r\n")
    assert _status(answer) == 201 and answer.endswith(b"""{"error": "Bad HTTP/0.9 request type ('EXTRA')"}\n""")
    assert (server.path / "data" / "ab" / "abcd").read_bytes() == b"hello"
    assert _wait_for(lambda: "400" in server.log())
    malformed = [line for line in server.log().splitlines() if " 400 " in line]
    assert len(malformed) == 1 and "data/ab/abcd" not in malformed[0], malformed
    large = random.randbytes(200_000)
    smuggled = b"DELETE /objects/data/ab/abcd HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = _request(server.port, _put_head("data/cd/cdcd", len(large)), large + smuggled)
    assert b"HTTP/1.1 201" in answer and b"HTTP/1.1 401" in answer  # the second request brought no token
    assert (server.path / "data" / "cd" / "cdcd").read_bytes() == large
    assert (server.path / "data" / "ab" / "abcd").read_bytes() == b"hello"


def test_each_connection_limit_is_logged_on_its_own(serve_factory, tmp_path):
    """A flood from one address hits the per-client limit, and then every other client the total one: the
    log says both, not only the first of them for a minute."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)), "--max-connections", "6",
                           "--max-connections-per-client", "3")
    held = []
    try:
        for source in ("127.0.0.2", "127.0.0.3"):
            for _ in range(4):  # the fourth from each address is refused: per client
                s = socket.socket()
                s.bind((source, 0))
                s.connect(("127.0.0.1", server.port))
                held.append(s)
        assert _wait_for(lambda: "--max-connections-per-client" in server.log())
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            # refused as it is taken, before the service reads a byte: a request sent meanwhile may meet the
            # close as a reset and lose the answer with it
            answer = s.recv(65536)
            assert _status(answer) == 503
            assert b"\r\nRetry-After: 1\r\n" in answer  # clients wait what it says: a place frees as a request ends
        assert _wait_for(lambda: "6 connections at once (--max-connections)" in server.log()), server.log()
    finally:
        for s in held:
            s.close()


# --- clients that misbehave, and the service's resources ------------------------------------------


def test_idle_and_trickling_connections_from_many_addresses_hold_bounded_resources_and_free_them(
        serve_factory, tmp_path):
    """Hundreds of idle keep-alive connections from 30 addresses and heads sent a byte at a time: the
    service holds a thread and a descriptor for each connection it takes (no more than its limit), refuses
    the rest, gives everything back once the timeouts pass, and then serves a well-behaved client at once."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)), "--quiet", "--max-connections", "60",
                           "--max-connections-per-client", "5", "--idle-timeout", "2", "--header-timeout", "2")
    threads0, fds0, rss0 = _usage(server.proc.pid)
    held: list[socket.socket] = []
    try:
        for n in range(300):
            s = socket.socket()
            s.bind((f"127.0.2.{2 + n % 30}", 0))
            s.connect(("127.0.0.1", server.port))  # the kernel takes it; the service refuses or keeps it
            held.append(s)
        for s in held[:20]:  # heads a byte at a time, on the kept connections and the refused ones alike
            s.sendall(b"P")
        peak = (0, 0, 0)
        for _ in range(10):
            for s in held[:20]:
                try:
                    s.send(b"U")
                except OSError:
                    pass
            usage = _usage(server.proc.pid)
            peak = tuple(max(a, b) for a, b in zip(peak, usage))
            time.sleep(0.1)
        threads, fds, rss = peak
        assert threads <= threads0 + 60 and fds <= fds0 + 60 + 4, peak
        assert rss < rss0 + 64 * 1024, peak
        assert _wait_for(lambda: _usage(server.proc.pid)[0] <= threads0 + 1, 10), _usage(server.proc.pid)
        assert _status(_request(server.port, _put_head("data/ab/good", 3), b"yes")) == 201
    finally:
        for s in held:
            s.close()
    assert _wait_for(lambda: _usage(server.proc.pid)[1] <= fds0 + 1, 10)
    assert "Traceback" not in server.log()


def test_a_token_revoked_during_its_upload_lets_that_upload_end_and_refuses_the_next_request(
        serve_factory, tmp_path):
    """SIGHUP mid-upload: the upload authorised before it is stored whole; the connection's next request,
    under the revoked token, is refused."""
    tokens = write_tokens(tmp_path)
    server = serve_factory("--tokens", str(tokens))
    body = random.randbytes(300_000)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(_put_head("data/ab/hup", len(body), APPEND_TOKEN).encode() + b"\r\n\r\n")
        for i in range(0, len(body), 50_000):
            s.sendall(body[i:i + 50_000])
            if i == 100_000:
                write_tokens(tmp_path, {"full": FULL_TOKEN})
                server.proc.send_signal(signal.SIGHUP)
                assert _wait_for(lambda: "reloaded 1 token(s)" in server.log())
        assert _status(_head(s)) == 201
        s.sendall(f"HEAD /objects/data/ab/hup HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {APPEND_TOKEN}"
                  "\r\n\r\n".encode())
        assert _status(_head(s)) == 401
    assert (server.path / "data" / "ab" / "hup").read_bytes() == body


@pytest.mark.slow
def test_sigterm_among_many_uploads_keeps_those_that_end_and_leaves_nothing_of_the_others(
        serve_factory, tmp_path):
    """Twelve uploads under way at SIGTERM: those that end within the service's wait are stored whole and
    answered; of those that crawl on, neither an object nor a temp file is left; the service exits 0."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)), "--quiet")
    bodies = {k: random.randbytes(200_000) for k in range(12)}
    answers: dict[int, bytes] = {}

    def upload(k: int) -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(_put_head(f"data/ef/u{k}", len(bodies[k])).encode() + b"\r\n\r\n")
            try:
                for i in range(0, len(bodies[k]), 10_000):
                    s.sendall(bodies[k][i:i + 10_000])
                    time.sleep(0.1 if k < 6 else 1.0)  # 2 s for the first six, 20 s for the others
                answers[k] = _head(s)
            except OSError:
                answers[k] = b""

    threads = [threading.Thread(target=upload, args=(k,)) for k in range(12)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert server.stop() == 0
    for thread in threads:
        thread.join(60)
    for k in range(6):
        assert answers[k].startswith(b"HTTP/1.1 201"), k
        assert (server.path / "data" / "ef" / f"u{k}").read_bytes() == bodies[k]
    assert all(not answers[k].startswith(b"HTTP/1.1 201") for k in range(6, 12))
    assert sorted(_files(server.path)) == [f"data/ef/u{k}" for k in range(6)]
    assert "Traceback" not in server.log()


def test_listings_of_a_large_directory_at_once_hold_memory_for_their_page_not_the_directory(
        serve_factory, tmp_path):
    """Eight clients ask at once for one short page of a directory of 20,000 objects (snapshots/ of many
    hosts, or locks/ an append-only client filled): the service holds memory for the pages, not for the
    whole directory once per request (a read-only token's listings ran it out of memory), and each page
    still starts where the last ended."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)), "--quiet")
    names = sorted(f"{n * 2654435761 % (1 << 64):064x}" for n in range(20_000))
    (server.path / "snapshots").mkdir()
    for name in names:
        (server.path / "snapshots" / name).touch()
    hwm0 = int(dict(line.split(":", 1) for line in Path(f"/proc/{server.proc.pid}/status").read_text()
                    .splitlines())["VmHWM"].split()[0])

    def page(after: str) -> list[str]:
        answer = _request(server.port, "GET /objects/?prefix=snapshots/&limit=50&after=" + after
                          + f" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READ_TOKEN}\r\nConnection: close")
        assert _status(answer) == 200, answer[:300]
        return [key for key, _ in json.loads(answer.partition(b"\r\n\r\n")[2])["objects"]]

    with ThreadPoolExecutor(8) as pool:
        pages = list(pool.map(page, ["", *(f"snapshots/{names[n]}" for n in (0, 49, 10_000, 19_970, 19_999))]))
    assert pages[0] == [f"snapshots/{n}" for n in names[:50]]
    assert pages[2] == [f"snapshots/{n}" for n in names[50:100]]
    assert pages[3] == [f"snapshots/{n}" for n in names[10_001:10_051]]
    assert pages[4] == [f"snapshots/{n}" for n in names[19_971:]] and pages[5] == []
    hwm = int(dict(line.split(":", 1) for line in Path(f"/proc/{server.proc.pid}/status").read_text()
                   .splitlines())["VmHWM"].split()[0])
    assert hwm - hwm0 < 16 * 1024, (hwm0, hwm)  # KiB; each listing held the whole directory: 40 MiB in all


def test_pages_of_a_few_objects_each_list_every_object_past_empty_directories_and_temp_files(
        serve_factory, tmp_path):
    """Pages of two objects, through data/ of 256 directories that mostly hold none (or only an upload under
    way): each page reads past them to the next objects, and the pages together list each object once."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)), "--quiet")
    stored = []
    for n in range(256):
        directory = server.path / "data" / f"{n:02x}"
        directory.mkdir(parents=True)
        (directory / ".tmp-upload").touch()
        if n % 50 == 7:
            for m in range(3):
                (directory / f"{n:02x}{m:062x}").touch()
                stored.append(f"data/{n:02x}/{n:02x}{m:062x}")
    listed, after = [], ""
    for _ in range(20):
        answer = _request(server.port, f"GET /objects/?prefix=data/&limit=2&after={after} HTTP/1.1\r\nHost: x\r\n"
                                       f"Authorization: Bearer {READ_TOKEN}\r\nConnection: close")
        page = json.loads(answer.partition(b"\r\n\r\n")[2])
        listed += [key for key, _ in page["objects"]]
        if not page["next"]:
            break
        after = page["next"]
    assert listed == stored


def test_a_client_refused_at_the_connection_limit_waits_for_room_instead_of_calling_the_service_unavailable(
        serve_factory, tmp_path):
    """Every connection the service takes is held (here its one, by a client that has sent nothing yet, until
    the header timeout closes it 3 s later): a new client's first requests are answered 503, try again.  That is the
    service answering, so the client waits for room as for a service that answered before (its retry time),
    instead of giving up after its few attempts as on a URL that leads nowhere: a backup starting while the
    service was full failed in some 15 s, before the idle timeout of 60 s could make room."""
    from chunkvault.errors import RemoteRetryWarning
    from chunkvault.remotes.http import HTTPRemote
    from chunkvault.remotes.layer import wrap_remote

    server = serve_factory("--tokens", str(write_tokens(tmp_path)), "--quiet", "--max-connections", "1",
                           "--header-timeout", "3")
    for _ in range(50):  # once the connection the start was checked on is let go
        held = socket.create_connection(("127.0.0.1", server.port), timeout=0.3)
        try:
            held.recv(1)  # refused: answered 503 and closed
        except TimeoutError:
            break
        held.close()
    with held:
        started = time.monotonic()
        with wrap_remote(HTTPRemote.from_url(server.url, token=READ_TOKEN), attempts=2, base_delay=0.05,
                         max_delay=0.2, outage=30) as remote, pytest.warns(RemoteRetryWarning):
            assert remote.stat("config") is None
    assert time.monotonic() - started > 2


def test_at_its_connection_limits_the_service_closes_an_idle_keep_alive_connection_for_a_new_client(
        serve_factory, tmp_path):
    """Keep-alive connections waiting for their next request (a client's pool between its uploads) fill the
    service's connections, and then one address's: a new client is served at once, the connection that
    waited longest closed for it (as nginx reuses idle keep-alive connections), instead of every new client
    answered 503 until the idle timeout (60 s by default) closed one.  A connection that has sent no request
    yet is not closed so."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)), "--quiet", "--max-connections", "3",
                           "--max-connections-per-client", "2", "--idle-timeout", "30")
    ask = f"HEAD /objects/config HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READ_TOKEN}\r\n\r\n".encode()

    def kept(source: str, tries: int = 50) -> socket.socket:
        for _ in range(tries):  # once the connection the start was checked on is let go
            s = socket.socket()
            s.bind((source, 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", server.port))
            s.sendall(ask)
            if _status(_head(s)) == 404:
                return s
            s.close()
            time.sleep(0.1)
        raise AssertionError("no connection taken")

    first, second = kept("127.0.0.1"), kept("127.0.0.1")
    silent = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.5.1", 0))
    held = [first, second, silent]
    time.sleep(0.3)  # their threads, done answering, wait for their next requests
    try:
        for source, closed in (("127.0.0.1", first), ("127.0.5.2", second)):  # one address's limit, then the total
            held.append(kept(source, 1))  # served at once, not answered 503
            closed.settimeout(5)
            assert closed.recv(1) == b""
        silent.settimeout(0.5)
        with pytest.raises(TimeoutError):
            silent.recv(1)
    finally:
        for s in held:
            s.close()
    assert "Traceback" not in server.log()


def test_connections_that_send_nothing_hold_their_places_for_the_header_timeout_not_the_idle_one(
        serve_factory, tmp_path):
    """A new connection waited the idle timeout (60 s) for its first byte, and then had the header timeout for
    the rest: a few hundred sockets that connect and send nothing (slowloris) kept every real client answered 503
    for a minute at a time.  A new connection's first request now has the header timeout from the connection's
    start, its line and headers all of them, however they trickle in; the idle timeout is for keep-alive
    connections between requests."""
    server = serve_factory("--tokens", str(write_tokens(tmp_path)), "--quiet", "--max-connections", "8",
                           "--max-connections-per-client", "8", "--header-timeout", "2", "--idle-timeout", "30")
    ask = f"HEAD /objects/config HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READ_TOKEN}\r\n\r\n".encode()

    def answered() -> int:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            try:
                s.sendall(ask)
                return _status(_head(s))
            except OSError:  # refused at once (503 and closed), its answer lost to the reset
                return 0

    held = [socket.create_connection(("127.0.0.1", server.port), source_address=(f"127.0.6.{n % 3 + 1}", 0))
            for n in range(30)]
    try:
        started = time.monotonic()
        while answered() != 404:  # 503 while the silent ones hold every place
            assert time.monotonic() - started < 15, "a real client waited past the header timeout"
            time.sleep(0.2)
        late = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        held.append(late)
        opened = time.monotonic()
        time.sleep(1.5)  # silent for most of the header timeout, then a byte every 0.3 s
        with pytest.raises(OSError):
            for byte in b"GET /objects/config HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"x" * 40:
                late.send(bytes([byte]))
                time.sleep(0.3)
                assert time.monotonic() - opened < 3.5, "the head's deadline began at its first byte"
                late.setblocking(False)
                try:
                    if late.recv(1) == b"":
                        raise ConnectionResetError("closed")
                except BlockingIOError:
                    pass
                late.setblocking(True)
    finally:
        for s in held:
            s.close()
    assert "Traceback" not in server.log()
