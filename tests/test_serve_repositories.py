"""``chunkvault serve --repositories``: one service, a repository per subdirectory, each token held to the
repositories its line names; every request over real HTTP to a real service."""
from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from chunkvault.errors import ObjectExists, PermissionDenied, RemoteError
from chunkvault.remotes.http import MISSING_HEADER, NO_REPOSITORY, HTTPRemote

from netutil import free_port
from servers_http import make_self_signed, run_serve, serve_factory, wait_for  # noqa: F401
from treeutil import describe

A_FULL = "full-a-token-0123456789"
B_FULL = "full-b-token-0123456789"
A_APPEND = "append-a-token-0123456789"
AB_READ = "read-ab-token-0123456789"
EVERY = "every-repo-token-0123456789"
TOKENS = [("full", A_FULL, "A"), ("full", B_FULL, "B"), ("append-only", A_APPEND, "A"), ("read-only", AB_READ, "A,B"),
          ("full", EVERY, "*")]
KEY = "data/ab/" + "ab" * 32
REFUSED = "no repository at this URL that the token may use"


def write_scoped_tokens(path: Path, lines: list[tuple[str, ...]]) -> Path:
    path.write_text("# MODE TOKEN REPOSITORIES\n" + "".join(" ".join(line) + "\n" for line in lines))
    path.chmod(0o600)
    return path


def raw(port: int, method: str, path: str, body: bytes | None = None, token: str | None = A_FULL
        ) -> tuple[int, dict[str, str], bytes]:
    """One request sent with its path exactly as given (the client's own checks bypassed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        conn.close()


def files_under(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (the reserves apart) and its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".reserve"}


def hangup_and_wait(server, line: str) -> None:
    count = server.log().count(line)
    server.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: server.log().count(line) > count), server.log()[-2000:]


@pytest.fixture
def repos(tmp_path: Path) -> Path:
    """The directory of repositories, with the tokens file in it (an operator's slip: it must stay out of
    reach, as any file beside the repositories)."""
    path = tmp_path / "repos"
    path.mkdir()
    write_scoped_tokens(path / "tokens", TOKENS)
    return path


@pytest.fixture
def several(serve_factory, repos):  # noqa: F811
    return serve_factory("--repositories", "--tokens", str(repos / "tokens"), path=repos)


def remote(server, name: str, token: str) -> HTTPRemote:
    return HTTPRemote.from_url(f"{server.url}{name}/", token=token)


def make_tree(root: Path, seed: int) -> None:
    root.mkdir()
    rnd = random.Random(seed)
    for i in range(4):
        (root / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 300_000)))


def _env(tmp_path: Path, token: str) -> dict[str, str]:
    return {"CHUNKVAULT_HTTP_TOKEN": token, "CHUNKVAULT_CACHE_DIR": str(tmp_path / f"cache-{token[:8]}")}


# --- two repositories through one service -------------------------------------------------------------------


def test_two_repositories_are_backed_up_restored_and_checked_through_one_service(several, repos, tmp_path, cli):
    for name, token, seed in (("A", A_FULL, 1), ("B", B_FULL, 2)):
        url, env, src = f"{several.url}{name}/", _env(tmp_path, token), tmp_path / f"src-{name}"
        make_tree(src, seed)
        cli("init", "-r", url, "--kdf-time", "0", "--pack-size", "200k", env=env)
        cli("backup", "-r", url, str(src), env=env)
        (src / "f0").write_bytes(f"changed in {name}".encode())
        cli("backup", "-r", url, str(src), "--type", "diff", env=env)
    for name, token in (("A", A_FULL), ("B", B_FULL)):
        url, env = f"{several.url}{name}/", _env(tmp_path, token)
        src, out = tmp_path / f"src-{name}", tmp_path / f"out-{name}"
        cli("restore", "-r", url, "latest", "--target", str(out), env=env)
        assert describe(out) == describe(src)
        cli("check", "-r", url, "--read-data", env=env)
        listing = json.loads(cli("snapshots", "-r", url, "--json", env=_env(tmp_path, EVERY)).stdout)
        assert sorted(s["type"] for s in listing) == ["diff", "full"]
        assert {p for s in listing for p in s["paths"]} == {str(src)}  # each repository its own snapshots
        assert (repos / name / "config").is_file() and not list((repos / name / "locks").iterdir())
        assert (repos / name).stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in repos.iterdir()) == ["A", "B", "tokens"]
    log = several.log()
    assert " PUT A/config 201 " in log and " PUT B/config 201 " in log and " GET list B prefix=" in log
    assert not any(token in log for _, token, _ in TOKENS)


# --- scopes -------------------------------------------------------------------------------------------------


def test_a_token_never_reaches_a_repository_its_line_does_not_name(several, repos, tmp_path, cli):
    """Reads, writes, deletes, listings and init on B with A's token: 404, in the same words as for C, which
    does not exist, so that the token learns nothing of B; nothing is written, nothing is made."""
    for name, token in (("A", A_FULL), ("B", B_FULL)):
        with remote(several, name, token) as r:
            r.put("config", f"{name} config".encode(), if_absent=True)
            r.put(KEY, f"{name} pack".encode())
    before = files_under(repos)
    answers: dict[str, list] = {"B": [], "C": []}
    for name in answers:
        for method, path, body in (("GET", f"/{name}/objects/config", None), ("HEAD", f"/{name}/objects/config", None),
                                   ("PUT", f"/{name}/objects/{KEY}", b"evil"), ("PUT", f"/{name}/objects/config", b"c"),
                                   ("DELETE", f"/{name}/objects/{KEY}", None), ("GET", f"/{name}/objects/", None),
                                   ("GET", f"/{name}/objects/?prefix=data/", None), ("GET", f"/{name}/objects", None)):
            for token in (A_FULL, A_APPEND):
                status, headers, data = raw(several.port, method, path, body, token)
                assert (status, headers.get(MISSING_HEADER)) == (404, NO_REPOSITORY), (method, path, status, data)
                answers[name].append((method, data.replace(f"'{name}'".encode(), b"'NAME'")))
    assert answers["B"] == answers["C"]
    with remote(several, "B", A_FULL) as r:
        for call in (lambda: r.get("config"), lambda: r.stat("config"), lambda: r.put(KEY, b"evil"),
                     lambda: list(r.list("")), lambda: r.delete(KEY)):
            with pytest.raises(PermissionDenied, match=REFUSED):
                call()
    with remote(several, "B", AB_READ) as r:  # a token that names B reads it
        assert r.get(KEY) == b"B pack"
        with pytest.raises(PermissionDenied, match="read-only"):
            r.put(KEY, b"evil")
    for name in ("B", "C"):
        result = cli("init", "-r", f"{several.url}{name}/", "--kdf-time", "0", env=_env(tmp_path, A_FULL), check=14)
        assert REFUSED in result.stderr.decode()
    assert files_under(repos) == before and not (repos / "C").exists()


def test_a_token_without_repositories_is_refused_by_a_service_of_several_and_one_with_them_by_a_service_of_one(
        repos, tmp_path):
    """A tokens file written for a service of one repository, reused, is not taken as giving each token every
    repository: the service does not start, naming the line; nor does a service of one take a line of scopes."""
    port = free_port()
    unscoped = write_scoped_tokens(tmp_path / "unscoped", [("full", A_FULL, "A"), ("append-only", A_APPEND)])
    result = run_serve("--repositories", "--listen", f"127.0.0.1:{port}", "--path", str(repos),
                       "--tokens", str(unscoped))
    assert result.returncode == 2
    assert f"tokens file {unscoped} line 3: name the repositories the token reaches" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and A_APPEND not in result.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    result = run_serve("--listen", f"127.0.0.1:{port}", "--path", str(plain), "--tokens", str(repos / "tokens"))
    assert result.returncode == 2 and "line 2: a third field names repositories" in result.stderr
    assert "--repositories" in result.stderr


@pytest.mark.parametrize("line, said", [
    (f"full {A_FULL} A,,B", "a comma too many"),
    (f"full {A_FULL} *,A", "* stands alone"),
    (f"full {A_FULL} ..", "no name of"),
    (f"full {A_FULL} .", "no name of"),
    (f"full {A_FULL} A/B", "no name of"),
    (f"full {A_FULL} .hidden", "no name of"),
    (f"full {A_FULL} A B", "expected 'MODE TOKEN NAME[,NAME...]'"),
    (f"full A {A_FULL}", "at least 16"),  # the names where the token goes, and the token where they go
    (f"full {A_FULL} {EVERY}+", "no name of"),
])
def test_a_line_whose_repositories_are_no_names_is_refused_without_quoting_it(repos, tmp_path, line, said):
    tokens = tmp_path / "tokens"
    tokens.write_text(line + "\n")
    tokens.chmod(0o600)
    result = run_serve("--repositories", "--listen", f"127.0.0.1:{free_port()}", "--path", str(repos),
                       "--tokens", str(tokens))
    assert result.returncode == 2 and said in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert A_FULL not in result.stderr and EVERY not in result.stderr


def test_an_append_only_token_is_held_to_append_only_in_its_repository_and_reaches_no_other(several, repos, tmp_path,
                                                                                            cli):
    url, src = f"{several.url}A/", tmp_path / "src"
    make_tree(src, 3)
    cli("init", "-r", url, "--kdf-time", "0", "--pack-size", "200k", env=_env(tmp_path, A_FULL))
    appender = _env(tmp_path, A_APPEND)
    cli("backup", "-r", url, str(src), env=appender)
    result = cli("forget", "-r", url, "--keep-last", "0", "--prune", env=appender, check=False)
    assert result.returncode != 0 and "append-only" in result.stderr.decode()
    with remote(several, "A", A_APPEND) as r:
        r.put(KEY, b"pack")
        with pytest.raises(PermissionDenied, match="append-only token.*overwritten"):
            r.put(KEY, b"evil")
        with pytest.raises(PermissionDenied, match="append-only token"):
            r.delete(KEY)
        with pytest.raises(ObjectExists):
            r.put("config", b"another", if_absent=True)
        lock = "locks/" + "1" * 32
        r.put(lock, b'{"kind": "shared", "time": 1}', if_absent=True)
        r.delete(lock)
    with remote(several, "B", A_APPEND) as r:
        with pytest.raises(PermissionDenied, match=REFUSED):
            r.put(KEY, b"pack")
    assert not (repos / "B").exists()
    assert (repos / "A" / KEY).read_bytes() == b"pack"


def test_append_only_service_caps_a_token_of_every_repository(serve_factory, repos):  # noqa: F811
    server = serve_factory("--repositories", "--append-only", "--tokens", str(repos / "tokens"), path=repos)
    assert "append-only" in server.log()
    for name in ("A", "B"):
        with remote(server, name, EVERY) as r:
            r.put(KEY, b"pack")
            with pytest.raises(PermissionDenied, match="--append-only"):
                r.delete(KEY)
    assert (repos / "A" / KEY).is_file() and (repos / "B" / KEY).is_file()


def test_sighup_changes_a_tokens_repositories_from_the_next_request_on(several, repos):
    with remote(several, "A", A_FULL) as on_a, remote(several, "B", A_FULL) as on_b:
        on_a.put("config", b"a")
        with pytest.raises(PermissionDenied, match=REFUSED):
            on_b.get("config")
        write_scoped_tokens(repos / "tokens", [("full", A_FULL, "B"), ("full", EVERY, "*")])
        hangup_and_wait(several, "reloaded 2 token(s)")
        with pytest.raises(PermissionDenied, match=REFUSED):  # on the connection it was served on before
            on_a.get("config")
        on_b.put("config", b"b")
        assert on_b.get("config") == b"b"
        write_scoped_tokens(repos / "tokens", [("full", A_FULL)])  # names none: refused, the scopes stay
        hangup_and_wait(several, "reload failed, serving with the settings loaded before")
        assert "line 2: name the repositories the token reaches" in several.log()
        assert on_b.get("config") == b"b"
        with pytest.raises(PermissionDenied, match=REFUSED):
            on_a.get("config")
    assert several.running


def test_repositories_over_https_and_a_plain_client_told_its_repositorys_url(serve_factory, repos,  # noqa: F811
                                                                             tmp_path):
    cert, key = make_self_signed(tmp_path)
    server = serve_factory("--repositories", "--tokens", str(repos / "tokens"), "--tls-cert", str(cert),
                           "--tls-key", str(key), tls=True, path=repos)
    with HTTPRemote.from_url(f"{server.url}A/", token=A_FULL, ca_file=str(cert)) as r:
        r.put(KEY, b"over tls")
        assert r.get(KEY) == b"over tls"
    with HTTPRemote.from_url(f"{server.url}B/", token=A_FULL, ca_file=str(cert)) as r:
        with pytest.raises(PermissionDenied, match=REFUSED):
            r.get(KEY)
    with HTTPRemote.from_url(f"{server.url.replace('https:', 'http:')}A/", token=A_FULL) as plain:
        with pytest.raises(RemoteError, match=f"speaks HTTPS: its URL is {re.escape(server.url)}A/$"):
            plain.get(KEY)


# --- names and paths --------------------------------------------------------------------------------------


TRICKS = [
    "xB/objects/config",  # no path: its first character was taken for the slash, and B served
    "http:/B/objects/config",
    "/A/../B/objects/config",
    "/A/%2e%2e/B/objects/config",
    "/A/%2E%2E/B/objects/config",
    "/A/objects/../../B/objects/config",
    "/A/objects/..%2F..%2FB%2Fobjects%2Fconfig",
    "/A/objects/%2e%2e/%2e%2e/tokens",
    "/../B/objects/config",
    "/%2e%2e/B/objects/config",
    "/%2e%2e%2fB/objects/config",
    "//B/objects/config",
    "///B/objects/config",
    "/A//objects/config",
    "/A/objects//config",
    "/A%2FB/objects/config",
    "/A%2f..%2fB/objects/config",
    "/A%5c..%5cB/objects/config",
    "/A\\..\\B/objects/config",
    "/./objects/config",
    "/%2e/objects/config",
    "/../objects/config",
    "/.reserve/objects/config",
    "/%41/objects/config",
    "/B%00/objects/config",
    "/" + "b" * 65 + "/objects/config",
]


def test_path_tricks_are_refused(several, repos, tmp_path):
    with remote(several, "B", B_FULL) as r:
        r.put("config", b"b config")
        r.put(KEY, b"b pack")
    before, outside = files_under(repos), sorted(os.listdir(tmp_path))
    for path in TRICKS:
        for token in (A_FULL, EVERY):
            for method, body in (("PUT", b"evil"), ("GET", None), ("HEAD", None), ("DELETE", None)):
                status, _, data = raw(several.port, method, path, body, token)
                assert status == 400, (path, method, status, data)
                if method != "HEAD":
                    assert b"B pack" not in data and b"b config" not in data and json.loads(data)["error"]
    assert files_under(repos) == before and sorted(os.listdir(tmp_path)) == outside
    assert not any(token in several.log() for _, token, _ in TOKENS)


def test_a_file_beside_the_repositories_is_no_repository(several, repos):
    """The tokens file kept in the directory of repositories: no name reaches it, and a write under its name
    is a conflict, not a repository made over it."""
    before = (repos / "tokens").read_bytes()
    status, headers, _ = raw(several.port, "GET", "/tokens/objects/config", token=EVERY)
    assert (status, headers.get(MISSING_HEADER)) == (404, "missing")
    status, _, data = raw(several.port, "GET", "/tokens/objects/", token=EVERY)
    assert (status, json.loads(data)["objects"]) == (200, [])
    status, _, data = raw(several.port, "PUT", "/tokens/objects/config", b"c", token=EVERY)
    assert status == 409 and "tokens is no directory" in json.loads(data)["error"]
    assert raw(several.port, "DELETE", "/tokens/objects/config", token=EVERY)[0] == 204
    assert (repos / "tokens").read_bytes() == before and (repos / "tokens").is_file()


def test_the_service_root_is_no_repository(several):
    with HTTPRemote.from_url(several.url, token=EVERY) as r:  # a URL without the repository's name
        with pytest.raises(RemoteError, match="serves several repositories, each at /NAME/"):
            r.get("config")
    with HTTPRemote.from_url(several.url, token=A_FULL) as r:
        with pytest.raises(PermissionDenied, match=REFUSED):
            r.get("config")


# --- making repositories --------------------------------------------------------------------------------------


def test_init_makes_a_repository_only_for_a_token_that_may_write_it(several, repos, tmp_path, cli):
    result = cli("init", "-r", f"{several.url}B/", "--kdf-time", "0", env=_env(tmp_path, AB_READ), check=14)
    assert "read-only" in result.stderr.decode() and not (repos / "B").exists()
    cli("init", "-r", f"{several.url}db-2.x/", "--kdf-time", "0", env=_env(tmp_path, EVERY))
    made = repos / "db-2.x"
    assert (made / "config").is_file() and made.stat().st_mode & 0o777 == 0o700
    assert (made / ".reserve").stat().st_size == 1 << 20  # its reserve, from its first write on
    result = cli("init", "-r", f"{several.url}db-2.x/", "--kdf-time", "0", env=_env(tmp_path, EVERY), check=10)
    assert "already exists" in result.stderr.decode()
    (repos / "E").write_bytes(b"a file of the operator's")
    result = cli("init", "-r", f"{several.url}E/", "--kdf-time", "0", env=_env(tmp_path, EVERY), check=False)
    assert result.returncode == 14 and "E is no directory" in result.stderr.decode()
    assert (repos / "E").read_bytes() == b"a file of the operator's"


# --- what holds for each repository apart ---------------------------------------------------------------------


def test_listings_conflicts_and_reserves_are_each_repositorys_own(serve_factory, repos):  # noqa: F811
    for name in ("A", "B"):
        (repos / name).mkdir()
        (repos / name / "config").write_bytes(name.encode())
    (repos / "notes").mkdir()  # a directory that holds no repository gets no reserve
    server = serve_factory("--repositories", "--tokens", str(repos / "tokens"), path=repos)
    assert (repos / "A" / ".reserve").is_file() and (repos / "B" / ".reserve").is_file()
    assert not (repos / "notes" / ".reserve").exists()
    with remote(server, "A", EVERY) as a, remote(server, "B", EVERY) as b:
        a.put(KEY, b"a pack")
        a.put("snapshots/" + "1" * 64, b"a snapshot")
        b.put("index/" + "2" * 64, b"b index")
        assert sorted(o.key for o in a.list()) == sorted(["config", KEY, "snapshots/" + "1" * 64])
        assert sorted(o.key for o in b.list()) == ["config", "index/" + "2" * 64]
        (repos / "A" / "data" / "cd").write_bytes(b"a file where a directory goes")
        with pytest.raises(RemoteError, match="data/cd is a file where the repository needs a directory"):
            a.put("data/cd/" + "cd" * 32, b"pack")
        b.put("data/cd/" + "cd" * 32, b"pack")


def test_abandoned_uploads_are_removed_from_every_repository(serve_factory, repos):  # noqa: F811
    old = time.time() - 7200
    abandoned = [repos / "A" / "data" / "ab" / ".tmp-0011", repos / "B" / ".tmp-2233"]
    fresh = repos / "B" / "index" / ".tmp-4455"
    for path in abandoned + [fresh]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half an upload")
    for path in abandoned:
        os.utime(path, (old, old))
    server = serve_factory("--repositories", "--tokens", str(repos / "tokens"), path=repos)
    assert wait_for(lambda: "removed 2 unfinished upload(s)" in server.log()), server.log()
    assert not any(path.exists() for path in abandoned) and fresh.exists()


def test_the_reserve_of_a_full_disk_is_each_repositorys_own(serve_factory, tmp_path):  # noqa: F811
    """An exclusive lock held in A lets a full token's write to A take A's reserve; B's stays for B's own
    forget or prune, and a write to B is refused as the disk is full."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        tokens = write_scoped_tokens(tmp_path / "tokens", TOKENS)
        for name in ("A", "B"):
            (disk / name).mkdir()
            (disk / name / "config").write_bytes(b"c")
        server = serve_factory("--repositories", "--tokens", str(tokens), path=disk)
        reserves = {name: disk / name / ".reserve" for name in ("A", "B")}
        assert all(r.stat().st_size == 1 << 20 for r in reserves.values())
        held = json.dumps({"kind": "exclusive", "host": "h", "pid": 1, "purpose": "prune",
                           "time": time.time()}).encode()
        assert raw(server.port, "PUT", "/A/objects/locks/x-" + "1" * 32, held, EVERY)[0] == 201
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - (256 << 10)))
        pack = os.urandom(768 << 10)  # more than is free, less than a reserve
        assert raw(server.port, "PUT", f"/B/objects/{KEY}", pack, EVERY)[0] == 507
        assert all(r.stat().st_size == 1 << 20 for r in reserves.values())
        assert raw(server.port, "PUT", f"/A/objects/{KEY}", pack, EVERY)[0] == 201
        assert not reserves["A"].exists() and reserves["B"].stat().st_size == 1 << 20
        (disk / "filler").unlink()  # room again, the lock still held: A's next write leaves the room to its command
        assert raw(server.port, "PUT", f"/A/objects/{KEY[:-1]}0", b"index", EVERY)[0] == 201
        assert not reserves["A"].exists()
        assert raw(server.port, "DELETE", "/A/objects/locks/x-" + "1" * 32, token=EVERY)[0] == 204
        assert reserves["A"].stat().st_size == 1 << 20  # the command ended: its lock's deletion made it again
        server.stop()
    finally:
        subprocess.run(["umount", str(disk)])


def test_connection_limits_are_the_services_across_repositories(serve_factory, repos):  # noqa: F811
    server = serve_factory("--repositories", "--tokens", str(repos / "tokens"), "--max-connections-per-client", "2",
                           path=repos)
    head = f"HEAD /A/objects/config HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {EVERY}\r\n\r\n".encode()
    held = []
    try:
        for _ in range(2):  # each served, then busy with its next request's head
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            held.append(s)
            s.sendall(head)
            assert s.recv(1000).startswith(b"HTTP/1.1 404")
            s.sendall(b"HEAD /A/objects/config HTTP/1.1\r\n")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as third:
            try:
                third.sendall(f"GET /B/objects/config HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {EVERY}\r\n\r\n"
                              .encode())
                reply = third.recv(1000)
            except OSError:
                reply = b""
        assert reply == b"" or reply.startswith(b"HTTP/1.1 503"), reply
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: raw(server.port, "GET", "/B/objects/config", token=EVERY)[0] == 404)
    assert "connection refused: the service serves at most 2 connections from one address" in server.log()


def test_a_repository_named_config_is_served_again_after_a_restart(serve_factory, repos):  # noqa: F811
    """A directory of repositories is refused as a repository itself when it holds a config file; a repository
    named config (one write of a token that reaches it made it) kept the service from starting again."""
    server = serve_factory("--repositories", "--tokens", str(repos / "tokens"), path=repos)
    with remote(server, "config", EVERY) as r:
        r.put("config", b"the config of repository config")
    assert server.stop() == 0
    server.start()
    with remote(server, "config", EVERY) as r:
        assert r.get("config") == b"the config of repository config"
    assert server.stop() == 0
    single = serve_factory(path=repos)  # served as one repository: said to hold several, config among them
    assert "holds no repository, and its subdirectories do (config): --repositories" in single.log()


# --- settings -------------------------------------------------------------------------------------------------


def test_the_mode_comes_from_the_config_file_too_and_a_repository_is_not_taken_for_a_directory_of_them(
        serve_factory, repos, tmp_path):  # noqa: F811
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(f'listen = "127.0.0.1:{port}"\npath = "repos"\nrepositories = true\ntokens = "repos/tokens"\n')
    server = serve_factory("--config", str(config), port=port, add_listen=False, add_path=False)
    assert f"repositories under {repos}, each at http://127.0.0.1:{port}/NAME/" in server.log()
    with remote(server, "A", A_FULL) as r:
        r.put("config", b"a")
    assert (repos / "A" / "config").read_bytes() == b"a"
    assert server.stop() == 0

    config.write_text(f'path = "{repos}"\nrepositories = "yes"\n')
    result = run_serve("--config", str(config))
    assert result.returncode == 2 and "repositories must be true or false" in result.stderr
    result = run_serve("--repositories", "--path", str(repos / "A"), "--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert f"{repos / 'A'} is a repository itself (it holds a config): serve it without --repositories" in result.stderr
    single = serve_factory(path=repos)  # the directory of repositories served as one: said at start
    assert "holds no repository, and its subdirectories do (A): --repositories serves each" in single.log()
    assert single.stop() == 0
    open_to_all = serve_factory("--repositories", path=repos)  # no tokens: loopback alone, every repository
    assert "read, overwrite and delete every repository under this directory" in open_to_all.log()
    with HTTPRemote.from_url(f"{open_to_all.url}C/") as r:
        r.put("config", b"c")
    assert (repos / "C" / "config").read_bytes() == b"c"
