"""What chunkvault leaves outside the repository: the files and directories it makes on this machine (the
cache, the ledger, the key kept ahead) are this user's alone whatever the umask, and no secret is written
where another user reads it (PostgreSQL's restore_command)."""
import os
import stat
import subprocess
import sys
from contextlib import contextmanager

import pytest
from servers_http import FULL_TOKEN, http_server, serve_factory  # noqa: F401
from walsegments import segment_bytes


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def modes_below(top) -> dict[str, int]:
    """Each path under ``top`` (itself too), relative to it, with its permission bits."""
    found = {".": stat.S_IMODE(os.lstat(top).st_mode)}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, top)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_private_dirs_made_0700_to_the_top(tmp_path, mask):
    from chunkvault.localfiles import make_private_dirs

    with umask(mask):
        make_private_dirs(str(tmp_path / "a" / "b" / "c"))
        make_private_dirs(str(tmp_path / "a" / "b" / "c"))  # there already: nothing to do
    assert modes_below(tmp_path / "a") == {".": 0o700, "b": 0o700, "b/c": 0o700}


def test_private_dirs_leave_existing_ones_and_refuse_a_file(tmp_path):
    from chunkvault.localfiles import make_private_dirs

    (tmp_path / "shared").mkdir(mode=0o755)
    os.chmod(tmp_path / "shared", 0o755)
    make_private_dirs(str(tmp_path / "shared" / "mine"))
    assert stat.S_IMODE(os.stat(tmp_path / "shared").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "shared" / "mine").st_mode) == 0o700
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):
        make_private_dirs(str(tmp_path / "file" / "below"))


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_cache_entries_and_directories_are_private(tmp_path, mask):
    """The cache holds copies of index, snapshot and key objects, which the repository stores 0600: under a
    permissive umask they were 0666 in 0777 directories."""
    from chunkvault.remotes.layer import CachingRemote
    from chunkvault.remotes.local import LocalRemote

    inner = LocalRemote(str(tmp_path / "repo"))
    cache = tmp_path / "home" / "cache" / "chunkvault" / "abc"
    with umask(mask):
        remote = CachingRemote(inner, cache)
        remote.put("index/" + "ab" * 32, b"sealed index")
        inner.put("snapshots/" + "cd" * 32, b"sealed snapshot")
        list(remote.list("snapshots/"))
        assert remote.get("snapshots/" + "cd" * 32) == b"sealed snapshot"
        assert remote.get("index/" + "ab" * 32) == b"sealed index"
    made = modes_below(tmp_path / "home")
    assert "cache/chunkvault/abc/index/" + "ab" * 32 in made
    assert "cache/chunkvault/abc/snapshots/" + "cd" * 32 in made
    for path, mode in made.items():
        wanted = 0o700 if os.path.isdir(tmp_path / "home" / path) else 0o600
        assert mode == wanted, (path, oct(mode))


def test_cache_base_and_key_ahead_are_private(tmp_path, monkeypatch):
    """The default cache's directories ($XDG_CACHE_HOME made too, as the XDG rules ask: 0700) and the key
    file kept ahead; a world-writable directory above would let another user put their own cache in."""
    from chunkvault import Repository

    monkeypatch.delenv("CHUNKVAULT_CACHE_DIR", raising=False)
    monkeypatch.delenv("CHUNKVAULT_NO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg" / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg" / "state"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"plain")
    with umask(0):
        with Repository.init(f"file://{tmp_path / 'repo'}", "pw", kdf_seconds=0) as repo:
            repo.backup([str(src)])
        from chunkvault.connection import cache_base, key_ahead_path
        from chunkvault.store.keyahead import KeyAhead

        base = cache_base()
        KeyAhead(key_ahead_path("sftp://h/x"), b"pw").remember(b"wrapped key file")
    assert base == str(tmp_path / "xdg" / "cache" / "chunkvault")
    for path, mode in modes_below(tmp_path / "xdg").items():
        full = tmp_path / "xdg" / path
        if os.path.isdir(full):
            assert mode == 0o700, (path, oct(mode))
        elif path.endswith("CACHEDIR.TAG"):
            continue  # the tag says what the directory is, nothing of the repository
        else:
            assert mode == 0o600, (path, oct(mode))
    assert any("key-ahead" in p for p in modes_below(tmp_path / "xdg"))
    assert any("ledger" in p for p in modes_below(tmp_path / "xdg"))


# --------------------------------------------------------------------------- restore --pg-recover's restore_command

TOKEN = "sixteen-plus-token-0123456789"


def _data_directory_snapshot(tmp_path, url: str, **options) -> None:
    """A repository at ``url`` holding one snapshot of a (made-up) PostgreSQL 15 data directory."""
    from chunkvault import Repository
    from conftest import PASSWORD

    pg = tmp_path / "pgdata"
    (pg / "global").mkdir(parents=True)
    (pg / "PG_VERSION").write_bytes(b"15\n")
    (pg / "global" / "pg_control").write_bytes(b"\0" * 8192)
    with Repository.init(url, PASSWORD, kdf_seconds=0, cache=False, **options) as repo:
        repo.backup([str(pg)])


def test_recovery_refuses_a_token_option_it_would_write_for_the_server(tmp_path, cli):
    """``-o http.token=`` went into restore_command: postgresql.auto.conf, --json and each of its runs' argv,
    which every user's ``ps`` shows; the restore is refused before anything is written."""
    repo = str(tmp_path / "repo")
    _data_directory_snapshot(tmp_path, repo)
    pwfile = tmp_path / "pw"
    pwfile.write_text("correct horse battery staple\n")
    target = tmp_path / "target"
    proc = cli("restore", "latest", "-r", repo, "--target", str(target), "--password-file", str(pwfile),
               "--pg-recover", "end", "-o", f"http.token={TOKEN}", check=2, password=None)
    err = proc.stderr.decode()
    assert "http.token-file" in err and TOKEN not in err
    assert not target.exists()


def test_recovery_over_http_takes_the_token_file_not_the_token(tmp_path, cli, http_server):
    """The service's token reaches the server's restore_command as its file (CHUNKVAULT_HTTP_TOKEN_FILE, as
    CHUNKVAULT_PASSWORD_FILE is written); a token only in the environment is refused before the restore, as
    CHUNKVAULT_PASSWORD is, instead of a recovery that fails with 401 once PostgreSQL asks for WAL."""
    _data_directory_snapshot(tmp_path, http_server.url, token=FULL_TOKEN)
    pwfile, tokfile = tmp_path / "pw", tmp_path / "tok"
    pwfile.write_text("correct horse battery staple\n")
    tokfile.write_text(FULL_TOKEN + "\n")
    common = ("restore", "latest", "-r", http_server.url, "--password-file", str(pwfile), "--pg-recover", "end",
              "--no-cache")
    proc = cli(*common, "--target", str(tmp_path / "t1"), env={"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN},
               password=None, check=2)
    assert "CHUNKVAULT_HTTP_TOKEN_FILE" in proc.stderr.decode() and FULL_TOKEN not in proc.stderr.decode()
    assert not (tmp_path / "t1").exists()
    cli(*common, "--target", str(tmp_path / "t2"), env={"CHUNKVAULT_HTTP_TOKEN_FILE": str(tokfile)}, password=None)
    conf = (tmp_path / "t2" / "postgresql.auto.conf").read_text()
    assert f"http.token-file={tokfile}" in conf and FULL_TOKEN not in conf
    assert stat.S_IMODE(os.stat(tmp_path / "t2" / "postgresql.auto.conf").st_mode) == 0o600
    # a relative path as given would be looked up in the data directory, where the server runs the command
    proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", *common, "--target", str(tmp_path / "t3"),
                           "-o", "http.token-file=tok"], cwd=tmp_path, capture_output=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")})
    assert proc.returncode == 0, proc.stderr
    assert f"http.token-file={tokfile} " in (tmp_path / "t3" / "postgresql.auto.conf").read_text()


def test_a_token_given_on_the_command_line_is_warned_about_once(cli, http_server, tmp_path):
    """It works, but every user's process listing shows it: the warning names the ways that do not."""
    cli("init", "-r", http_server.url, "--kdf-time", "0", env={"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN})
    proc = cli("snapshots", "-r", http_server.url, "-o", f"http.token={FULL_TOKEN}", "--no-cache")
    said = proc.stderr.decode()
    assert said.count("process listing") == 1 and "http.token-file" in said and FULL_TOKEN not in said
    quiet = cli("snapshots", "-r", http_server.url, "--no-cache", env={"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN})
    assert "process listing" not in quiet.stderr.decode()


# --------------------------------------------------------------------------- psql's command line

@pytest.mark.parametrize("given, argv_d, password", [
    ("mydb", "mydb", None),
    ("host=/run/pg dbname=app", "host=/run/pg dbname=app", None),
    ("host=/run/pg dbname=app password=hunter22", "host='/run/pg' dbname='app'", "hunter22"),
    ("user = 'o\\'k' password = 'a b\\\\c'", "user='o\\'k'", "a b\\c"),
    ("postgresql://u:p%40ss@h:5433/app?sslmode=require", "postgresql://u@h:5433/app?sslmode=require", "p@ss"),
    ("postgres://u@h/app?password=z%26z&sslmode=disable", "postgres://u@h/app?sslmode=disable", "z&z"),
    ("postgresql:///app?host=%2Frun%2Fpg&options=-c%20a%3Db+c&password=x", "postgresql:///app?host=%2Frun%2Fpg&"
     "options=-c%20a%3Db+c", "x"),
    ("password=only", None, "only"),
    ("host=/run/pg password=ends\\", "host='/run/pg'", "ends"),  # a backslash at the end escapes nothing
])
def test_psql_gets_the_password_in_its_environment_not_its_argv(tmp_path, given, argv_d, password):
    """``backup --postgres``/``archive-check --pg-connect`` (a policy's ``postgres =`` too) ran ``psql -d
    CONNINFO``: a password in it was in every user's ``ps`` for the whole backup."""
    from chunkvault.pgsession import PgBackupSession

    psql = tmp_path / "psql"
    psql.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$0.argv"\nprintf "%s" "${PGPASSWORD-unset}" > "$0.pw"\n'
                    'cat > /dev/null\n')
    psql.chmod(0o700)
    session = PgBackupSession(given, psql=str(psql), env={"PATH": os.environ["PATH"], "PGPASSWORD": "outer"})
    session.open()
    session.close()
    argv = (tmp_path / "psql.argv").read_text().splitlines()
    assert (argv[argv.index("-d") + 1] if "-d" in argv else None) == argv_d
    assert (tmp_path / "psql.pw").read_text() == (password or "outer")
    if password:
        assert not any(password in a for a in argv)


@pytest.mark.parametrize("given, said", [
    ("host=/run/pg password=hunter22 dbname", "the connection string does not parse"),
    ("host=/run/pg password='hunter22", "the connection string does not parse"),
    ("password=hunter 22", "the connection string does not parse"),  # libpq: missing "=" after "22"
    ("host=/run/pg PASSWORD=hunter22", 'invalid connection option "PASSWORD"'),
])
def test_a_connection_string_libpq_cannot_parse_never_reaches_psqls_argv(tmp_path, cli, given, said):
    """psql refused such a string, but only after every user's process listing had shown it whole, password
    and all; it is refused before psql runs, in one line that does not show it, with psql's exit code."""
    from chunkvault.errors import SourceCommandFailed
    from chunkvault.pgsession import PgBackupSession

    psql = tmp_path / "psql"
    psql.write_text('#!/bin/sh\nprintf "%s\\n" "$@" >> "$0.argv"\nexit 2\n')
    psql.chmod(0o700)
    with pytest.raises(SourceCommandFailed, match=f"^PostgreSQL: {said}") as e:
        PgBackupSession(given, psql=str(psql)).open()
    assert "hunter" not in str(e.value)
    cli("init", "-r", str(tmp_path / "repo"), "-q")
    datadir = tmp_path / "data"
    datadir.mkdir()
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    for command in (["backup", "--postgres", "--pg-connect", given, str(datadir)],
                    ["archive-check", "--pg-connect", given]):
        out = cli(*command, "-r", str(tmp_path / "repo"), env=env, check=20)
        assert out.stderr.decode().count("\n") == 1 and said in out.stderr.decode()
        assert "hunter" not in out.stderr.decode()
    assert not (tmp_path / "psql.argv").exists()


# --------------------------------------------------------------------------- archive-push/-get --spool

SEGMENTS = ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003"]


def test_spool_directories_are_private_under_umask_000(tmp_path):
    """The spool holds WAL (the database's data in clear): its directories were made 0777 under umask 000
    (``os.makedirs`` gave 0700 to the last alone), where another user could put a directory of files ahead
    of their own in the one kept for the repository."""
    from chunkvault.walspool import Prefetched, Spool

    with umask(0):
        fetched = Prefetched(str(tmp_path / "var" / "spool"), "file:///srv/repo abc")
        Spool(str(tmp_path / "push" / "spool"), "file:///srv/repo abc")
    for top in ("var", "push"):
        assert set(modes_below(tmp_path / top).values()) == {0o700}, modes_below(tmp_path / top)
    assert os.path.dirname(fetched.path) == str(tmp_path / "var" / "spool")


@pytest.mark.parametrize("open_", ["push", "get", "get-inner"])
def test_a_spool_others_may_write_in_is_not_used(tmp_path, open_):
    from chunkvault.walspool import Prefetched, Spool

    spool = tmp_path / "spool"
    spool.mkdir()
    if open_ == "get-inner":  # the directory kept for the repository, put there by someone else
        inner = Prefetched(str(spool), "r").path
        os.chmod(inner, 0o777)
    else:
        os.chmod(spool, 0o777)
    with pytest.raises(OSError, match="other users may write in it"):
        (Spool if open_ == "push" else Prefetched)(str(spool), "r")


def test_archive_get_with_a_spool_others_may_write_in_fetches_the_file_alone(tmp_path, cli, new_repo):
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    wal = tmp_path / "wal"
    wal.mkdir()
    for i, name in enumerate(SEGMENTS):
        (wal / name).write_bytes(segment_bytes(name, 1 << 20, i))
        repo.archive_push(str(wal / name))
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o777)
    os.chmod(spool, 0o777)
    dest = tmp_path / "pg_wal" / SEGMENTS[0]
    dest.parent.mkdir()
    with umask(0):
        proc = cli("archive-get", "-r", url, "--spool", str(spool), SEGMENTS[0], str(dest))
    assert "other users may write in it" in proc.stderr.decode()
    assert dest.read_bytes() == segment_bytes(SEGMENTS[0], 1 << 20, 0)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    assert os.listdir(spool) == []  # nothing fetched ahead into it
    os.chmod(spool, 0o700)
    cli("archive-get", "-r", url, "--spool", str(spool), SEGMENTS[0], str(dest))
    (inner,) = os.listdir(spool)
    assert sorted(modes_below(spool / inner).items()) == [(".", 0o700), *((n, 0o600) for n in SEGMENTS[1:])]


# --------------------------------------------------------------------------- serve

def test_a_tokens_file_line_the_wrong_way_round_is_refused_without_its_token(tmp_path):
    """``TOKEN MODE`` was refused as "unknown mode 'the-token'": on the terminal, and in the service's log when
    a reload (SIGHUP) read such a file."""
    from servers_http import run_serve

    (tmp_path / "srv").mkdir()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{FULL_TOKEN} full\n")
    tokens.chmod(0o600)
    proc = run_serve("--path", str(tmp_path / "srv"), "--tokens", str(tokens), "--listen", "127.0.0.1:0")
    assert proc.returncode == 2 and "MODE comes first" in proc.stderr and FULL_TOKEN not in proc.stderr
    tokens.write_text("ful abcdefghijklmnopq\n")
    proc = run_serve("--path", str(tmp_path / "srv"), "--tokens", str(tokens), "--listen", "127.0.0.1:0")
    assert proc.returncode == 2 and "unknown mode 'ful'" in proc.stderr


# --------------------------------------------------------------------------- restore

@pytest.mark.parametrize("how", ["new target", "in place"])
def test_a_directory_private_in_the_snapshot_is_never_open_while_its_files_are_restored(tmp_path, new_repo,
                                                                                        monkeypatch, how):
    """A 0644 file is private when its directory is 0700 (~/.ssh, /root): the target's root was made at the
    umask's 0755, and a directory there in place kept its 0755, until the whole restore was in; a restore
    stopped half-way left them so."""
    from chunkvault.store import writefiles
    from chunkvault.store.restore import Restorer

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for rel in ("a.txt", "sub/b.txt"):
        (src / rel).write_text("readable for its directory's sake")
        os.chmod(src / rel, 0o644)
    os.chmod(src / "sub", 0o700)
    os.chmod(src, 0o700)
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    target = tmp_path / "target"
    if how == "in place":
        (target / "sub").mkdir(parents=True)
        (target / "a.txt").write_text("old")
        for path, mode in ((target, 0o755), (target / "sub", 0o755), (target / "a.txt", 0o644)):
            os.chmod(path, mode)
    seen = []  # (a file just written, the modes of the directories above it then)

    def note(path: bytes) -> None:
        above = [".", *(["sub"] if path.startswith(b"sub/") else [])]
        seen.append((path, {p: stat.S_IMODE(os.stat(target / p).st_mode) for p in above}))

    real_file, real_run = Restorer._restore_file, writefiles.write_small_files

    def file_noted(self, e, pf):
        real_file(self, e, pf)
        note(e.path)

    def run_noted(run, owners):
        results = real_run(run, owners)
        for pfd, name, *_ in run:
            where = os.path.join(os.readlink(f"/proc/self/fd/{pfd}"), os.fsdecode(name))
            note(os.fsencode(os.path.relpath(where, target)))
        return results

    monkeypatch.setattr(Restorer, "_restore_file", file_noted)
    monkeypatch.setattr(writefiles, "write_small_files", run_noted)
    with umask(0o022):
        repo.restore(snap, str(target), processes=1, force=how == "in place", delta=how == "in place")
    assert sorted(p for p, _ in seen) == [b"a.txt", b"sub/b.txt"], seen
    assert all(mode & 0o077 == 0 for _, modes in seen for mode in modes.values()), seen
    assert modes_below(target) == {".": 0o700, "a.txt": 0o644, "sub": 0o700, "sub/b.txt": 0o644}


# --------------------------------------------------------------------------- children's environment

def _env_recorder(tmp_path, name: str):
    program = tmp_path / name
    program.write_text('#!/bin/sh\nenv > "$0.env"\nexit 1\n')
    program.chmod(0o700)
    return program


def test_ssh_and_psql_get_none_of_our_credentials(tmp_path, monkeypatch):
    """Hooks and --then commands were given an environment without them, but ssh (whose ProxyCommand,
    LocalCommand and Match exec inherit it) and psql had the repository's password and the service's token."""
    from chunkvault.pgsession import PgBackupSession
    from chunkvault.remotes.sftp_sessions import OpenSSHSessions, SSHTarget, openssh_settings

    for name, value in (("CHUNKVAULT_PASSWORD", "repo-secret"), ("CHUNKVAULT_HTTP_TOKEN", TOKEN),
                        ("CHUNKVAULT_TO_PASSWORD_FILE", "/x/pw"), ("CHUNKVAULT_REPOSITORY", "/srv/repo"),
                        ("SSH_AUTH_SOCK", "/run/agent"), ("PGPASSWORD", "theirs")):
        monkeypatch.setenv(name, value)
    ssh, psql = _env_recorder(tmp_path, "ssh"), _env_recorder(tmp_path, "psql")
    target = SSHTarget("127.0.0.1", 22, "u", (), None, False, None, 5.0)
    assert openssh_settings(target, str(ssh)) == {}  # ssh -G: its Match exec runs commands
    (tmp_path / "ssh.env").rename(tmp_path / "ssh-G.env")
    with pytest.raises(Exception):
        OpenSSHSessions(target, str(ssh)).open()
    session = PgBackupSession("dbname=app", psql=str(psql))
    session.open()
    session.close()
    for recorded in ("ssh-G.env", "ssh.env", "psql.env"):
        env = dict(line.split("=", 1) for line in (tmp_path / recorded).read_text().splitlines() if "=" in line)
        assert not {"CHUNKVAULT_PASSWORD", "CHUNKVAULT_HTTP_TOKEN", "CHUNKVAULT_TO_PASSWORD_FILE"} & set(env)
        assert env["CHUNKVAULT_REPOSITORY"] == "/srv/repo" and env["SSH_AUTH_SOCK"] == "/run/agent"
    assert "PGPASSWORD=theirs" in (tmp_path / "psql.env").read_text()


def test_the_service_settings_repr_shows_no_token(tmp_path):
    from chunkvault.remotes.server import parse_settings

    (tmp_path / "srv").mkdir()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"full {FULL_TOKEN}\n")
    tokens.chmod(0o600)
    settings = parse_settings(["--path", str(tmp_path / "srv"), "--tokens", str(tokens)])
    assert settings.tokens == [(FULL_TOKEN.encode(), "full")]
    assert FULL_TOKEN not in repr(settings) and str(tokens) in repr(settings)


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_a_local_repository_is_this_users_alone_to_change_whatever_the_umask(tmp_path, mask):
    """Its objects were 0600 but its directories 0777 under umask 000: another user could delete packs."""
    from chunkvault.remotes.local import LocalRemote

    with umask(mask):
        remote = LocalRemote(str(tmp_path / "top" / "repo"))
        remote.put("data/ab/" + "ab" * 32, b"sealed pack")
        remote.put("config", b"sealed config")
    for path, mode in modes_below(tmp_path / "top").items():
        if os.path.isdir(tmp_path / "top" / path):
            assert mode == 0o700, (path, oct(mode))
        else:
            assert not mode & 0o077, (path, oct(mode))


def test_a_policys_state_file_is_writable_by_this_user_alone_whatever_the_umask(tmp_path):
    """Under umask 000 it was 0666: another user could mark a failed verification passed."""
    from chunkvault.scheduler import _write_state

    path = tmp_path / "policy.toml.state"
    (tmp_path / f"policy.toml.state.tmp{os.getpid()}").write_text("left by a crashed run")
    os.chmod(tmp_path / f"policy.toml.state.tmp{os.getpid()}", 0o666)
    with umask(0o000):
        _write_state(str(path), {}, print)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644 and path.read_text().startswith("{")


def test_a_target_the_restore_made_is_opened_as_the_umask_has_it_where_no_root_mode_is_recorded(tmp_path, new_repo):
    """Made 0700 while it fills: a snapshot of several paths, or of a stream, records no root directory whose
    mode the target would take at the end, and a dump restored for another user to read stayed 0700."""
    repo = new_repo(str(tmp_path / "repo"))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    os.chmod(tmp_path / "a", 0o700)
    several = repo.backup([str(tmp_path / "a"), str(tmp_path / "b")]).snapshot
    one = repo.backup([str(tmp_path / "a")]).snapshot
    with umask(0o022):
        repo.restore(several.id, str(tmp_path / "t1"))
        repo.restore(one.id, str(tmp_path / "t2"))
        repo.restore(several.id, str(tmp_path / "t3"), processes=2)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "t1") == mode(tmp_path / "t3") == 0o755  # the target itself is no path of the snapshot
    assert mode(tmp_path / "t1" / str(tmp_path / "a").lstrip("/")) == 0o700  # each path its recorded mode
    assert mode(tmp_path / "t2") == 0o700  # the one path's root is the target: its recorded mode


def test_https_options_name_the_token_file_as_http_ones_do(monkeypatch):
    """``https.X`` is ``http.X``: a token file given so was taken for none, and the token in the environment
    refused, or the environment's file written over the one given."""
    from chunkvault.cli import _token_for_server

    monkeypatch.setenv("CHUNKVAULT_HTTP_TOKEN", FULL_TOKEN)
    assert _token_for_server("https://h:6362/", ["https.token-file=/etc/tok"]) == []
    monkeypatch.delenv("CHUNKVAULT_HTTP_TOKEN")
    monkeypatch.setenv("CHUNKVAULT_HTTP_TOKEN_FILE", "/elsewhere")
    assert _token_for_server("https://h:6362/", ["https.token_file=/etc/tok"]) == []


def test_a_spool_reached_through_a_link_is_judged_by_the_directory_it_leads_to(tmp_path):
    """A spool linked to a larger disk was refused as no directory, and every file went alone."""
    from chunkvault.walspool import private_dir

    (tmp_path / "big").mkdir(mode=0o700)
    os.chmod(tmp_path / "big", 0o700)
    (tmp_path / "spool").symlink_to(tmp_path / "big")
    private_dir(str(tmp_path / "spool"))
    os.chmod(tmp_path / "big", 0o777)
    with pytest.raises(OSError):
        private_dir(str(tmp_path / "spool"))
