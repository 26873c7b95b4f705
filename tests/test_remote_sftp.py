"""The SFTP remote against a real OpenSSH server on 127.0.0.1."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from chunkvault.errors import ObjectExists, ObjectNotFound, PermissionDenied, RemoteUnavailable, UsageError
from chunkvault.remotes import open_remote
from chunkvault.remotes.layer import RetryingRemote
from chunkvault.remotes.sftp import TEMP_PREFIX, _config_known_hosts, parse_sftp_url
from chunkvault.remotes.sftp_sessions import resolve_transport
from remote_contract import check_remote_contract
from netutil import free_port
from servers_ssh import known_host_entry, sftp_repo, sshd  # noqa: F401

TRANSPORTS = ("openssh", "paramiko")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_contract(sftp_repo, transport):
    with open_remote(sftp_repo.url, **sftp_repo.options, transport=transport) as remote:
        check_remote_contract(remote)
    leftovers = [n for _, _, files in os.walk(sftp_repo.path) for n in files]
    assert leftovers == []


def test_parse_url():
    assert parse_sftp_url("sftp://backup@host.example:2222/srv/repo") == ("backup", "host.example", 2222, "/srv/repo")
    assert parse_sftp_url("sftp://host/srv/repo/") == (None, "host", None, "/srv/repo")
    assert parse_sftp_url("sftp://u@h/~/repos/a") == ("u", "h", None, "~/repos/a")
    assert parse_sftp_url("sftp://h/x/db%3Bv2%3Fa%23b") == (None, "h", None, "/x/db;v2?a#b")
    for bad in ("sftp://u@h/", "sftp://u@h/~", "sftp:///x", "sftp://u:secret@h/x", "sftp://h:99999999/x",
                "sftp://h/x/db;v2", "sftp://h/x/a?b", "sftp://h/x/a#b", "sftp://h/x/a?", "sftp://h/x/a#",
                "sftp://-oProxyCommand=true/x", "sftp://-l@h/x", "sftp://a%0Ab@h/x", "sftp://a b/x"):
        with pytest.raises(UsageError):
            parse_sftp_url(bad)
    with pytest.raises(UsageError, match="^bad port in SFTP URL 'sftp://h:0/x'$"):  # port 22 was connected to
        parse_sftp_url("sftp://h:0/x")


def test_password_in_url_is_refused_without_echoing_it():
    with pytest.raises(UsageError) as info:
        open_remote("sftp://u:hunter2@127.0.0.1/x")
    assert "hunter2" not in str(info.value)


def test_unknown_options_are_named(sftp_repo):
    with pytest.raises(UsageError, match="unknown SFTP option.s.: bogus .known: accept-new-host-key, .*retry-time"):
        open_remote(sftp_repo.url, bogus=1)


@pytest.mark.parametrize("option, words", [
    ({"connect_timeout": "soon"}, "SFTP option connect-timeout must be a number, not 'soon'"),
    ({"connect_timeout": 0}, "SFTP option connect-timeout must be at least 0.1"),
    ({"channels": 0}, "SFTP option channels must be at least 1"),
    ({"channels": "2.5"}, "SFTP option channels must be an integer"),
    ({"channels": 1.5}, "SFTP option channels must be an integer"),
    ({"connect_timeout": float("inf")}, "SFTP option connect-timeout must be a number, not inf"),
    ({"connect_timeout": "nan"}, "SFTP option connect-timeout must be a number"),
    ({"connect_timeout": 1e12}, "SFTP option connect-timeout must be at most 86400"),
    ({"channels": 1_000_000_000}, "SFTP option channels must be at most 1024"),
])
def test_bad_numbers_are_usage_errors_before_connecting(option, words):
    with pytest.raises(UsageError, match=words):
        open_remote("sftp://u@127.0.0.1:1/x", **option)


def test_a_switch_misspelled_or_a_missing_ssh_config_is_refused_before_connecting(monkeypatch):
    """A typo of yes was taken for no (and the host key refused, with advice to say yes); a missing ssh
    config was retried 8 times as an outage."""
    with pytest.raises(UsageError, match="^SFTP option accept-new-host-key takes yes or no, not 'ture'$"):
        open_remote("sftp://u@127.0.0.1:1/x", accept_new_host_key="ture")
    monkeypatch.setenv("CHUNKVAULT_SFTP_ACCEPT_NEW_HOST_KEY", "maybe")
    with pytest.raises(UsageError, match="^CHUNKVAULT_SFTP_ACCEPT_NEW_HOST_KEY takes yes or no, not 'maybe'$"):
        open_remote("sftp://u@127.0.0.1:1/x")
    monkeypatch.delenv("CHUNKVAULT_SFTP_ACCEPT_NEW_HOST_KEY")
    for transport in TRANSPORTS:
        with pytest.raises(UsageError, match="^SSH config file /no/such/config does not exist$"):
            open_remote("sftp://u@127.0.0.1:1/x", ssh_config="/no/such/config", transport=transport)
        with pytest.raises(UsageError, match="^SSH config file /dev/zero is not a regular file$"):  # not "does not exist"
            open_remote("sftp://u@127.0.0.1:1/x", ssh_config="/dev/zero", transport=transport)


def test_ssh_config_dev_null_reads_no_config(sshd, sftp_repo, transport, monkeypatch, tmp_path):
    """``ssh -F /dev/null``: ssh's own way to leave ~/.ssh/config out, refused as "not a regular file".
    Given, the remote opens with no config read: a home directory's that would send the host elsewhere is
    left out (paramiko's reading of it is shown; ssh reads the one of the user's passwd entry, left alone)."""
    from chunkvault.remotes.sftp import SFTPRemote

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host 127.0.0.1\n  HostName 192.0.2.1\n")
    monkeypatch.setenv("HOME", str(home))
    assert SFTPRemote._ssh_config("127.0.0.1", None)["hostname"] == "192.0.2.1"
    assert SFTPRemote._ssh_config("127.0.0.1", "/dev/null").get("hostname", "127.0.0.1") == "127.0.0.1"
    with open_remote(sftp_repo.url, ssh_config="/dev/null", transport=transport, **sftp_repo.options) as remote:
        remote.put("probe", b"x")
        assert remote.get("probe") == b"x"


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


def test_unknown_host_is_refused_unless_accepted(sshd, sftp_repo, tmp_path, transport):
    known = tmp_path / "not-made-yet" / "known_hosts"  # accepting makes it: else ssh trusts and records nothing
    with pytest.raises(PermissionDenied, match="unknown SSH host key") as info:
        open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), transport=transport)
    if transport == "paramiko":  # OpenSSH's client names no fingerprint when it refuses an unknown host
        assert "SHA256:" in str(info.value)
    assert not known.exists()

    with open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), accept_new_host_key=True,
                     transport=transport) as r:
        r.put("config", b"x")
    assert sshd.host_pub.split()[1] in known_host_entry(str(known), sshd.port)
    # once recorded, the host is known without the option
    with open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), transport=transport) as r:
        assert r.get("config") == b"x"


def test_accept_new_from_environment(sshd, sftp_repo, tmp_path, monkeypatch, transport):
    known = tmp_path / "known_hosts"
    monkeypatch.setenv("CHUNKVAULT_SFTP_KEY_FILE", sshd.user_key)
    monkeypatch.setenv("CHUNKVAULT_SFTP_KNOWN_HOSTS", str(known))
    monkeypatch.setenv("CHUNKVAULT_SFTP_ACCEPT_NEW_HOST_KEY", "1")
    monkeypatch.setenv("CHUNKVAULT_SFTP_TRANSPORT", transport)
    remote = open_remote(sftp_repo.url)
    assert remote.transport == transport
    remote.close()
    assert known.read_text().strip()


def test_changed_host_key_is_refused_even_with_accept_new(sshd, sftp_repo, tmp_path, transport):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {(tmp_path / 'other_key.pub').read_text().split(' ', 2)[0]} "
                     f"{(tmp_path / 'other_key.pub').read_text().split()[1]}\n")
    before = known.read_text()
    for accept in (False, True):
        with pytest.raises(PermissionDenied, match="does not match") as info:
            open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), accept_new_host_key=accept,
                        transport=transport)
        message = str(info.value)
        assert "SHA256:" in message and "ed25519" in message.lower()
        # how to trust the new key, once confirmed: the old entry is the user's to remove, never replaced
        assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}' -f {known}" in message
        assert "accept-new-host-key=yes" in message and "\n" not in message
    assert known.read_text() == before


def test_a_revoked_host_key_is_refused_and_no_option_accepts_it(sshd, sftp_repo, tmp_path, transport):
    known = tmp_path / "known_hosts"
    key = " ".join(sshd.host_pub.split()[:2])
    entry = f"[127.0.0.1]:{sshd.port} {key}\n"
    other_ca = f"@cert-authority * {' '.join(sshd.user_pub.split()[:2])}\n"
    for lines in (entry + "@revoked " + entry, "@revoked " + entry, f"@revoked * {key}\n",
                  f"@revoked * {key}\n" + other_ca + entry):
        known.write_text(lines)
        for accept in (False, True):
            with pytest.raises(PermissionDenied, match=r"(?i)ed25519 SSH host key of 127\.0\.0\.1:\d+ is marked "
                                                       f"@revoked in {known}") as info:
                open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known),
                            accept_new_host_key=accept, transport=transport)
            assert "accept-new-host-key" not in str(info.value)  # no option trusts it
            assert known.read_text() == lines


def test_known_hosts_marker_lines_and_lines_that_do_not_parse_are_read_as_openssh_reads_them(sshd, sftp_repo,
                                                                                              tmp_path, transport):
    known = tmp_path / "known_hosts"
    entry = f"[127.0.0.1]:{sshd.port} {' '.join(sshd.host_pub.split()[:2])}\n"
    known.write_text(f"# a comment\n@cert-authority *.example {' '.join(sshd.user_pub.split()[:2])}\n"
                     "@revoked\nbroken.example ssh-ed25519 not-base64!\n" + entry)
    with open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), transport=transport) as remote:
        assert remote.stat("config") is None


def test_known_hosts_patterns_match_as_openssh_matches_them(sshd, sftp_repo, tmp_path, transport):
    """Host patterns (``*``, ``?``, a negated ``!pattern``) as OpenSSH reads them, which for a port other than
    22 takes a line for the bare host too: paramiko took each pattern for a host's name, so a host known by a
    pattern was called unknown."""
    known = tmp_path / "known_hosts"
    key = " ".join(sshd.host_pub.split()[:2])
    for patterns in ("[127.0.0.*]:*", f"[127.0.0.?]:{sshd.port}", f"other.example,[127.*]:{sshd.port}",
                     f"[127.0.0.*]:{sshd.port},!other.example", "127.0.0.1", "127.0.0.?", "!127.0.0.1,*"):
        known.write_text(f"{patterns} {key}\n")
        with open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), transport=transport) as r:
            assert r.stat("config") is None, patterns
    for patterns in (f"[127.0.0.*]:*,![127.0.0.1]:{sshd.port}", "[127.0.0.2]:*", "127.*,!127.0.0.1", "[127.0.0.1]:?",
                     "10.0.0.*"):
        known.write_text(f"{patterns} {key}\n")
        with pytest.raises(PermissionDenied, match="unknown SSH host key"):
            open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), transport=transport)


def test_a_key_listed_for_the_port_is_not_outweighed_by_the_bare_host_s(sshd, sftp_repo, tmp_path, transport):
    """OpenSSH looks a key up without the port only when no line for ``[host]:port`` lists one of its type:
    one listed there that differs is a changed key, whatever a line for the bare host (the server on port 22)
    lists.  paramiko took the server's key as known when any of those lines listed it."""
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    other_key = " ".join((tmp_path / "other_key.pub").read_text().split()[:2])
    key = " ".join(sshd.host_pub.split()[:2])
    known = tmp_path / "known_hosts"
    for lines in (f"[127.0.0.1]:{sshd.port} {other_key}\n127.0.0.1 {key}\n",
                  f"127.0.0.1 {key}\n[127.0.0.*]:* {other_key}\n"):
        known.write_text(lines)
        with pytest.raises(PermissionDenied, match="does not match"):
            open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), transport=transport)
    known.write_text(f"127.0.0.1 {other_key}\n[127.0.0.1]:{sshd.port} {key}\n")
    with open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), transport=transport) as r:
        assert r.stat("config") is None
    # only the bare host listed, with another key: unknown, not changed; accept-new records [host]:port
    known.write_text(f"127.0.0.1 {other_key}\n")
    with pytest.raises(PermissionDenied, match="unknown SSH host key"):
        open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), transport=transport)
    with open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), accept_new_host_key=True,
                     transport=transport) as r:
        assert r.stat("config") is None
    recorded = known.read_text().splitlines()
    assert len(recorded) == 2 and recorded[-1].split()[1:] == key.split()  # its name hashed, by OpenSSH's config
    with open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), transport=transport) as r:
        assert r.stat("config") is None


def test_a_host_listed_with_several_keys_of_one_type_is_known_by_each(sshd, sftp_repo, tmp_path, transport):
    """OpenSSH takes a host's key when any line lists it for that host (a name kept for two machines, a key
    listed before and after a move), hashed names too: the order of the lines makes no difference."""
    import paramiko

    known = tmp_path / "known_hosts"
    name = f"[127.0.0.1]:{sshd.port}"
    hashed = paramiko.HostKeys.hash_host(name)
    key, other = (" ".join(pub.split()[:2]) for pub in (sshd.host_pub, sshd.user_pub))
    for lines in (f"{name} {key}\n{name} {other}\n", f"{name} {other}\n{name} {key}\n",
                  f"{hashed} {other}\n{name} {key}\n{hashed} {other}\n"):
        known.write_text(lines)
        with open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known),
                         transport=transport) as remote:
            assert remote.stat("config") is None
        assert known.read_text() == lines


def test_wrong_user_key_is_refused(sshd, sftp_repo, tmp_path, transport):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(PermissionDenied, match="authentication"):
        open_remote(sftp_repo.url, key_file=str(stranger), known_hosts=sshd.known_hosts, transport=transport)


def test_a_key_file_with_a_passphrase_is_named_with_how_to_use_it(sshd, sftp_repo, tmp_path, transport, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pass phrase 1", "-f", str(locked)], check=True)
    with pytest.raises(PermissionDenied, match=f"key file {locked} has a passphrase.*ssh-add {locked}") as info:
        open_remote(sftp_repo.url, key_file=str(locked), known_hosts=sshd.known_hosts, ssh_config=os.devnull,
                    transport=transport)
    assert "pass phrase" not in str(info.value)
    unlocked = tmp_path / "unlocked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(unlocked)], check=True)
    with pytest.raises(PermissionDenied, match=r"failed \(no accepted key\)$"):
        open_remote(sftp_repo.url, key_file=str(unlocked), known_hosts=sshd.known_hosts, ssh_config=os.devnull,
                    transport=transport)


def test_no_key_at_all_is_a_refused_login_at_once(sshd, sftp_repo, tmp_path, monkeypatch):
    """No key file, no agent, no ~/.ssh/id_*: a login that cannot succeed, not an outage to retry.  (paramiko's
    home is $HOME; OpenSSH's client would look into the account's own.)"""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(PermissionDenied, match=f"authentication as '{sshd.user}' to 127.0.0.1:{sshd.port} failed"):
        open_remote(sftp_repo.url, known_hosts=sshd.known_hosts, ssh_config=os.devnull, transport="paramiko")


def test_no_server_is_unavailable(sshd, tmp_path, transport):
    url = f"sftp://{sshd.user}@127.0.0.1:{free_port()}{tmp_path}/repo"
    remote = open_remote(url, **sshd.options, connect_timeout=5, transport=transport)
    with pytest.raises(RemoteUnavailable, match="cannot connect"):
        remote.stat("config")
    remote.close()


def test_an_ipv6_server_is_named_in_brackets_in_messages(sshd, tmp_path, transport):
    """Not "cannot connect to SSH server ::1:2222", where the port reads as a part of the address."""
    port = free_port()
    remote = open_remote(f"sftp://{sshd.user}@[::1]:{port}{tmp_path}/repo", **sshd.options, connect_timeout=5,
                         transport=transport)
    with pytest.raises(RemoteUnavailable, match=re.escape(f"cannot connect to SSH server [::1]:{port}: ")):
        remote.stat("config")
    remote.close()

def test_a_server_that_never_speaks_ssh_is_one_line_of_its_own(sshd, tmp_path, transport, capfd):
    """A port that accepts connections and sends nothing: a timeout named as such, no traceback on stderr."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"sftp://{sshd.user}@127.0.0.1:{listener.getsockname()[1]}{tmp_path}/repo"
        remote = open_remote(url, **sshd.options, connect_timeout=1, transport=transport)
        with pytest.raises(RemoteUnavailable, match="cannot connect to SSH server 127.0.0.1:.*(banner|handshake)"):
            remote.stat("config")
        remote.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err


def test_a_server_that_closes_the_connection_at_once_is_not_said_to_be_silent(sshd, tmp_path, transport):
    """A connection closed before the SSH banner (sshd's MaxStartups, a host rule): paramiko's 'Error reading
    SSH protocol banner' was read as a server that sent nothing, 'no SSH handshake within N s', at once."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        stop = threading.Event()

        def close_each() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    listener.accept()[0].close()

        closer = threading.Thread(target=close_each, daemon=True)
        closer.start()
        url = f"sftp://{sshd.user}@127.0.0.1:{listener.getsockname()[1]}{tmp_path}/repo"
        remote = open_remote(url, **sshd.options, connect_timeout=30, transport=transport)
        try:
            with pytest.raises(RemoteUnavailable, match="cannot connect to SSH server 127.0.0.1:") as info:
                remote.stat("config")
        finally:
            remote.close()
            stop.set()
            listener.shutdown(socket.SHUT_RDWR)
        closer.join()
    assert "within" not in str(info.value)
    assert re.search(r"clos|reset", str(info.value))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("path", ["/abs", "~"])
def test_a_server_restarting_when_the_command_starts_is_retried(tmp_path, transport, path):
    """A scheduled job starting while sshd restarts must wait for it, as over S3 and HTTP."""
    from servers_ssh import SSHServer, require_sshd

    require_sshd()
    (tmp_path / "srv").mkdir()
    server = SSHServer(str(tmp_path / "srv"))
    server.start()
    port = server.port
    server.stop()
    where = f"{tmp_path}/repo" if path == "/abs" else f"/~/{tmp_path.name}-repo"
    # the timeout decides, not a count of attempts: eight attempts a second apart at most (with jitter, often
    # less) could all fail before a loaded machine has sshd listening again
    remote = RetryingRemote(open_remote(server.url(where), **server.options, connect_timeout=5, transport=transport),
                            attempts=10_000, base_delay=0.5, max_delay=1.0, timeout=60)
    restarted: list[BaseException | None] = []

    def restart_server() -> None:
        try:
            server.start(port=port)
            restarted.append(None)
        except BaseException as exc:  # shown by the test, not lost in the timer's thread
            restarted.append(exc)

    restart = threading.Timer(1.5, restart_server)
    restart.start()
    in_home = os.path.join(os.path.expanduser("~"), f"{tmp_path.name}-repo")
    try:
        remote.put("config", b"x")
        assert remote.get("config") == b"x"
        assert remote.retries > 0
        if path == "~":
            assert os.path.isfile(os.path.join(in_home, "config"))
    finally:
        restart.join()
        assert restarted == [None], f"sshd did not come back on port {port}: {restarted}"
        remote.close()
        server.stop()
        shutil.rmtree(in_home, ignore_errors=True)


def test_writes_go_through_temp_names(sftp_repo):
    with open_remote(sftp_repo.url, **sftp_repo.options) as remote:
        remote.put("data/ab/" + "a" * 64, b"payload")
        # a crashed upload leaves a temp file: never listed, removed by cleanup once old
        stale = os.path.join(sftp_repo.path, "data", "ab", TEMP_PREFIX + "dead")
        fresh = os.path.join(sftp_repo.path, "data", "ab", TEMP_PREFIX + "live")
        for p in (stale, fresh):
            with open(p, "wb") as f:
                f.write(b"half")
        os.utime(stale, (0, 0))
        assert [i.key for i in remote.list()] == ["data/ab/" + "a" * 64]
        assert remote.cleanup_temp(older_than=3600) == 1
        assert not os.path.exists(stale) and os.path.exists(fresh)


def test_a_rewrite_moves_the_mtime_on_and_still_lands_where_setstat_is_refused(sftp_repo, monkeypatch):
    from chunkvault.remotes.sftp_client import SFTPClient, StatusError

    key = "snapshots/" + "b" * 64
    with open_remote(sftp_repo.url, **sftp_repo.options) as remote:
        remote.put(key, b"first")
        path = os.path.join(sftp_repo.path, "snapshots", "b" * 64)
        os.utime(path, (2_000_000_000, 2_000_000_000))  # later than now: the rewrite must still pass it
        remote.put(key, b"again")
        assert os.stat(path).st_mtime == 2_000_000_001
        assert remote.stat(key).version == "2000000001.5"

        def refused(self, path, mtime):
            raise StatusError("SFTP status 8 (operation unsupported)")

        monkeypatch.setattr(SFTPClient, "set_mtime", refused)
        remote.put(key, b"third")
        assert remote.get(key) == b"third"


def test_paramiko_connection_sends_without_nagle(sftp_repo):
    import socket

    with open_remote(sftp_repo.url, **sftp_repo.options, transport="paramiko") as remote:
        sock = remote._sessions.transport().sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_reads_across_request_boundaries(sftp_repo, transport):
    """A pack-sized put (more than 100 writes in flight, when paramiko looks for early replies) and ranged reads
    that start and end inside 32 KiB requests."""
    data = os.urandom((5 << 20) + 12_345)
    with open_remote(sftp_repo.url, **sftp_repo.options, transport=transport) as remote:
        remote.put("data/cd/" + "c" * 64, data)
        for start, length in [(0, 32 * 1024), (1, 32 * 1024), (32 * 1024 - 1, 65 * 1024 + 2),
                              (100, 256 * 1024 + 1), (5, 900_000), (len(data) - 40_000, 80_000), (0, None)]:
            end = len(data) if length is None else start + length
            assert remote.get("data/cd/" + "c" * 64, start, length) == data[start:end], (start, length)


def test_a_file_whose_name_no_object_has_is_not_listed(sftp_repo, transport):
    """A desktop's .DS_Store beside the objects: listed, its name stopped every command as an invalid key."""
    with open_remote(sftp_repo.url, **sftp_repo.options, transport=transport) as remote:
        remote.put("snapshots/" + "a" * 64, b"snap")
        for name in ("snapshots/.DS_Store", "snapshots/notes~", ".DS_Store"):
            with open(os.path.join(sftp_repo.path, name), "wb") as f:
                f.write(b"x")
        assert [i.key for i in remote.list()] == ["snapshots/" + "a" * 64]


def drop_connections(remote) -> None:
    """Cut every connection the remote holds, as a network failure or a server restart would."""
    if remote.transport == "paramiko":
        remote._sessions.transport().close()
    else:
        for sftp in remote._pool:
            sftp.sock.proc.kill()
            sftp.sock.proc.wait()


def test_reconnects_after_the_connection_drops(sftp_repo, transport):
    with open_remote(sftp_repo.url, **sftp_repo.options, transport=transport) as remote:
        remote.put("config", b"before")
        drop_connections(remote)
        assert remote.get("config") == b"before"
        remote.put("index/" + "b" * 64, b"after")
        assert {i.key for i in remote.list()} == {"config", "index/" + "b" * 64}


def test_a_connection_lost_in_the_middle_of_a_call_is_unavailable_so_it_is_retried(sftp_repo, transport):
    """paramiko says "Socket is closed" with no errno: it was taken for a permanent failure, and a backup whose
    link dropped while it wrote a pack stopped at once."""
    with open_remote(sftp_repo.url, **sftp_repo.options, transport=transport) as remote:
        remote.put("config", b"x")

        def cut_then_ask(sftp):
            if transport == "paramiko":
                drop_connections(remote)
            else:  # the session in use, not in the pool meanwhile
                sftp.sock.proc.kill()
                sftp.sock.proc.wait()
            sftp.mkdir(remote._path("index"))

        with pytest.raises(RemoteUnavailable):
            remote._call("making index/", None, cut_then_ask)
        assert remote.get("config") == b"x"  # and the next call reconnects


def test_an_error_answer_keeps_the_session(sftp_repo, transport):
    with open_remote(sftp_repo.url, **sftp_repo.options, transport=transport) as remote:
        remote.put("config", b"x")
        (session,) = remote._pool
        with pytest.raises(ObjectNotFound):
            remote.get("index/" + "e" * 64)
        with pytest.raises(ObjectExists):
            remote.put("config", b"y", if_absent=True)
        assert remote._pool == [session]


def test_openssh_sessions_ignore_the_terminals_ctrl_c(sftp_repo):
    """ssh runs in its own process group: a Ctrl-C reaches chunkvault, which then still has its sessions
    to release its lock with."""
    with open_remote(sftp_repo.url, **sftp_repo.options, transport="openssh") as remote:
        (session,) = remote._pool
        assert os.getpgid(session.sock.proc.pid) != os.getpgid(0)
        proc = session.sock.proc
    assert proc.returncode is not None  # closing the remote ended its ssh process


def test_server_gone_mid_session_is_unavailable(tmp_path, transport):
    from servers_ssh import SSHServer, require_sshd

    require_sshd()
    (tmp_path / "srv").mkdir()
    server = SSHServer(str(tmp_path / "srv"))
    server.start()
    try:
        remote = open_remote(server.url(str(tmp_path / "repo")), **server.options, connect_timeout=5,
                             transport=transport)
        remote.put("config", b"x")
    finally:
        server.stop()
    drop_connections(remote)  # sshd's children outlive the listener; drop ours too
    with pytest.raises(RemoteUnavailable):
        remote.get("config")
    remote.close()


def test_a_lock_left_when_the_server_stopped_answering_does_not_wait_for_its_refresh(tmp_path, monkeypatch):
    """A command that gave up on a server gone away leaves its lock to go stale, but waited for the lock's
    refresh under way, which retried the server for a whole retry window more (15 minutes by default, with
    nothing said): it ends at once."""
    from servers_ssh import SSHServer, require_sshd

    from chunkvault.store import locks

    require_sshd()
    monkeypatch.setattr(locks, "REFRESH_EVERY", 0.1)
    (tmp_path / "srv").mkdir()
    server = SSHServer(str(tmp_path / "srv"))
    server.start()
    remote = RetryingRemote(open_remote(server.url(f"{tmp_path}/repo"), **server.options, connect_timeout=2),
                            outage=60)
    try:
        remote.put("config", b"x")
        with pytest.raises(RemoteUnavailable, match="gave up"):
            with locks.RepoLock(remote, locks.SHARED, "backup") as lock:
                server.stop()
                drop_connections(remote.inner)
                deadline = time.monotonic() + 30
                while remote.retries == 0 and time.monotonic() < deadline:  # the refresh retries the server
                    time.sleep(0.05)
                assert remote.retries > 0
                gave_up = RemoteUnavailable("gave up")
                gave_up.remote = remote.display_url
                started = time.monotonic()
                raise gave_up
        assert time.monotonic() - started < 5
        assert os.path.isfile(f"{tmp_path}/repo/{lock.key}")  # left to go stale
    finally:
        remote.close()

def test_auto_takes_openssh_when_installed_else_paramiko(monkeypatch, tmp_path):
    assert resolve_transport("auto") == ("openssh" if shutil.which("ssh") else "paramiko")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve_transport("auto") == "paramiko"
    with pytest.raises(UsageError, match="transport"):
        resolve_transport("telnet")


def test_openssh_transport_without_ssh_is_one_clear_error(sftp_repo, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match="cannot run the SSH client 'ssh'.*transport=paramiko"):
        open_remote(sftp_repo.url, **sftp_repo.options, transport="openssh")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_host_alias_of_the_ssh_config_names_its_user_and_port(sshd, tmp_path, transport):
    """The URL names an alias; the configuration file says where it leads.  The remote's name (in messages,
    and the local cache's) carries the user and port the connection used."""
    config = tmp_path / "ssh_config"
    config.write_text(f"Host backup-alias\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
                      f"  IdentityFile {sshd.user_key}\n")
    url = f"sftp://backup-alias{tmp_path}/repo"
    with open_remote(url, known_hosts=sshd.known_hosts, ssh_config=str(config), transport=transport) as remote:
        remote.put("config", b"x")
        assert remote.display_url == f"sftp://{sshd.user}@backup-alias:{sshd.port}{tmp_path}/repo"
    assert (tmp_path / "repo" / "config").read_bytes() == b"x"


def test_an_ssh_config_that_ssh_refuses_is_a_usage_error_at_once(sshd, tmp_path, cli):
    """It was taken for an outage: the same refusal retried 8 times, then "unavailable" (exit 14)."""
    config = tmp_path / "ssh_config"
    config.write_text(f"Host backup-alias\n  HostName 127.0.0.1\n  Port {sshd.port}\n  IdentityFile {tmp_path}/a b\n"
                      "  NoSuchOption yes\n")
    started = time.monotonic()
    said = cli("snapshots", "-r", f"sftp://backup-alias{tmp_path}/repo", "-o", f"sftp.ssh-config={config}",
               "-o", "sftp.transport=openssh", env=sshd.env, check=2).stderr.decode()
    assert said == (f"chunkvault: ssh refuses its configuration: {config} line 4: keyword identityfile extra "
                    "arguments at end of line (and 1 more)\n")
    assert time.monotonic() - started < 10

@pytest.mark.parametrize("proxy", ["ProxyJump bastion", "ProxyCommand ssh -W %h:%p bastion"])
def test_paramiko_refuses_a_proxy_it_cannot_follow_instead_of_connecting_directly(sshd, tmp_path, proxy):
    config = tmp_path / "ssh_config"
    config.write_text(f"Host backup-alias\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
                      f"  IdentityFile {sshd.user_key}\n  {proxy}\n")
    with pytest.raises(UsageError, match=f"sends backup-alias through {proxy.split()[0]}, which "
                                         "sftp.transport=paramiko cannot follow"):
        open_remote(f"sftp://backup-alias{tmp_path}/repo", known_hosts=sshd.known_hosts, ssh_config=str(config),
                    transport="paramiko")
    assert not (tmp_path / "repo").exists()
    config.write_text(config.read_text().replace(proxy, "ProxyCommand none"))
    with open_remote(f"sftp://backup-alias{tmp_path}/repo", known_hosts=sshd.known_hosts, ssh_config=str(config),
                     transport="paramiko") as remote:
        remote.put("config", b"x")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_known_hosts_file_an_ssh_config_names_is_the_one_read(sshd, tmp_path, transport):
    config = tmp_path / "ssh_config"
    config.write_text(f"Host backup-alias\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
                      f"  IdentityFile {sshd.user_key}\n  UserKnownHostsFile {sshd.known_hosts}\n")
    with open_remote(f"sftp://backup-alias{tmp_path}/repo", ssh_config=str(config), transport=transport) as remote:
        remote.put("config", b"x")
    assert (tmp_path / "repo" / "config").read_bytes() == b"x"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_known_hosts_file_an_ssh_config_names_quoted_with_spaces_is_read(sshd, tmp_path, transport):
    """paramiko hands the value quoted whole over unquoted: its first word was taken for the file."""
    (tmp_path / "my dir").mkdir()
    known = tmp_path / "my dir" / "known hosts"
    shutil.copy(sshd.known_hosts, known)
    config = tmp_path / "ssh_config"
    config.write_text(f"Host backup-alias\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
                      f"  IdentityFile {sshd.user_key}\n  UserKnownHostsFile \"{known}\"\n")
    with open_remote(f"sftp://backup-alias{tmp_path}/repo", ssh_config=str(config), transport=transport) as remote:
        remote.put("config", b"x")
    assert (tmp_path / "repo" / "config").read_bytes() == b"x"
    (tmp_path / "kh").write_text("")
    assert _config_known_hosts(f"{tmp_path}/kh {tmp_path}/more", "h", "u") == f"{tmp_path}/kh"  # two files

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_failure_names_the_port_the_ssh_config_sets(sshd, tmp_path, transport):
    """Nothing listens where the configuration leads: the error names that port, not 22."""
    port = free_port()
    config = tmp_path / "ssh_config"
    config.write_text(f"Host backup-alias\n  HostName 127.0.0.1\n  Port {port}\n  User {sshd.user}\n"
                      f"  IdentityFile {sshd.user_key}\n")
    url = f"sftp://backup-alias{tmp_path}/repo"
    with open_remote(url, known_hosts=sshd.known_hosts, ssh_config=str(config), transport=transport,
                     connect_timeout=5) as remote:
        with pytest.raises(RemoteUnavailable) as failed:
            remote.put("config", b"x")
    assert re.search(rf"SSH server \S+:{port}:", str(failed.value)), failed.value


def test_the_remote_names_itself_by_a_url_that_opens_it_again(sshd, tmp_path):
    """A path with ; ? # or % was named decoded (`init` printed .../r;x), in a URL the parser refuses."""
    url = sshd.url(f"{tmp_path}/r%3Bx%3Fy%23z%25")
    with open_remote(url, **sshd.options) as remote:
        remote.put("config", b"x")
        named = remote.display_url
    assert named.endswith(f"{tmp_path}/r%3Bx%3Fy%23z%25")
    with open_remote(named, **sshd.options) as again:
        assert again.get("config") == b"x"
    assert (tmp_path / "r;x?y#z%" / "config").read_bytes() == b"x"


def test_openssh_sessions_leave_paramiko_unloaded(sftp_repo):
    """Over OpenSSH's client, paramiko (0.1 s of imports) has nothing to do."""
    code = ("import sys\nfrom chunkvault.remotes import open_remote\n"
            f"with open_remote({sftp_repo.url!r}, key_file={sftp_repo.options['key_file']!r}, "
            f"known_hosts={sftp_repo.options['known_hosts']!r}, transport='openssh') as r:\n"
            "    r.put('config', b'x')\n    assert r.get('config') == b'x'\n"
            "print('paramiko' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found += children
        todo += children
    return found


def test_a_paramiko_session_whose_server_stops_answering_times_out_and_the_next_reconnects(tmp_path, monkeypatch):
    """A server that stops answering (its session process stopped, a link that drops every packet): paramiko
    would wait forever in a read, and every later channel would be opened on the dead connection. The read
    gives up, and the next request connects again."""
    import signal
    import threading

    from chunkvault.remotes import sftp_sessions
    from servers_ssh import SSHServer, require_sshd

    require_sshd()
    monkeypatch.setattr(sftp_sessions, "STALL_SECONDS", 2)
    server = SSHServer(str(tmp_path))
    server.start()
    stopped: list[int] = []
    try:
        (tmp_path / "repo").mkdir()
        with open_remote(server.url(str(tmp_path / "repo")), **server.options, transport="paramiko") as remote:
            remote.put("keys/a", b"x" * 100)
            stopped = _descendants(server.proc.pid)
            assert stopped
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            outcome: list[BaseException | bytes] = []

            def read() -> None:
                try:
                    outcome.append(remote.get("keys/a"))
                except BaseException as exc:
                    outcome.append(exc)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(30)
            assert outcome and isinstance(outcome[0], RemoteUnavailable)
            assert remote.get("keys/a") == b"x" * 100  # a new connection, to a new session process
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        server.stop()


def test_init_makes_the_repository_directory_s_missing_parents(sftp_repo, cli):
    """As on local disk (it failed with "writing keys/...: No such file")."""
    url = sftp_repo.url + "/new/a/b/repo"
    cli("init", "-r", url, "--kdf-time", "0", env=sftp_repo.env)
    assert os.path.isfile(os.path.join(sftp_repo.path, "new/a/b/repo/config"))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_file_where_the_repository_should_be_is_named(sftp_repo, cli, transport):
    """As on local disk: the server answers "no such file" of any path below a file, and an init there said only
    that (writing keys/...: No such file); reads find no repository."""
    os.makedirs(sftp_repo.path)
    with open(os.path.join(sftp_repo.path, "f"), "w") as f:
        f.write("not a directory")
    env = {**sftp_repo.env, "CHUNKVAULT_SFTP_TRANSPORT": transport}
    for below in ("/f", "/f/sub/repo"):
        said = cli("init", "-r", sftp_repo.url + below, "--kdf-time", "0", env=env, check=14).stderr
        assert f"failed: Not a directory ({sftp_repo.path}/f is a file)".encode() in said, said
    said = cli("snapshots", "-r", sftp_repo.url + "/f", env=env, check=10).stderr.decode().strip()
    assert said == f"chunkvault: no repository at {sftp_repo.url}/f"

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_symbolic_link_to_nothing_where_the_repository_should_be_is_named(sftp_repo, cli, tmp_path, transport):
    """A link to a disk not mounted: the server's word for the mkdir that failed was "Failure"."""
    os.makedirs(sftp_repo.path)
    os.symlink(tmp_path / "not-mounted", os.path.join(sftp_repo.path, "link"))
    env = {**sftp_repo.env, "CHUNKVAULT_SFTP_TRANSPORT": transport}
    for below in ("/link", "/link/repo"):
        said = cli("init", "-r", sftp_repo.url + below, "--kdf-time", "0", env=env, check=14).stderr
        assert f"failed: {sftp_repo.path}/link is a symbolic link to a path that does not exist".encode() in said, said
    assert not os.path.exists(tmp_path / "not-mounted")

def test_objects_and_the_directories_made_are_private_to_the_servers_user(sftp_repo, cli, tmp_path):
    """As on local disk, whatever the server's umask: they were 0644 and 0755, a key file for every account on
    the server to copy and guess the password of offline."""
    url = sftp_repo.url + "/private/repo"
    cli("init", "-r", url, "--kdf-time", "0", env=sftp_repo.env)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(os.urandom(5000))
    cli("backup", "-r", url, str(tmp_path / "src"), env=sftp_repo.env)
    modes = {}
    for d, dirs, files in os.walk(os.path.join(sftp_repo.path, "private")):
        for name in dirs + files:
            path = os.path.join(d, name)
            modes[os.path.relpath(path, sftp_repo.path)] = stat.S_IMODE(os.lstat(path).st_mode)
    assert any(k.startswith("private/repo/keys/") for k in modes) and any("/data/" in k for k in modes)
    assert {k: oct(m) for k, m in modes.items() if m != (0o700 if os.path.isdir(
        os.path.join(sftp_repo.path, k)) else 0o600)} == {}


@pytest.mark.parametrize("transport", ["openssh", "paramiko"])
def test_a_key_file_whose_path_holds_a_percent_sign_logs_in(sftp_repo, tmp_path, transport):
    """OpenSSH's client dropped such a key given with -i (it looks for the path before expanding %%)."""
    import shutil

    key = tmp_path / "keys%d" / "id"
    key.parent.mkdir()
    shutil.copy(sftp_repo.options["key_file"], key)
    os.chmod(key, 0o600)
    with open_remote(sftp_repo.url, key_file=str(key), known_hosts=sftp_repo.options["known_hosts"],
                     transport=transport) as remote:
        remote.put("config", b"x")
        assert remote.get("config") == b"x"


@pytest.mark.parametrize("transport", ["openssh", "paramiko"])
def test_a_missing_key_file_is_named(sftp_repo, transport):
    """OpenSSH's client only warns of it, then reports a login refused for want of an accepted key; paramiko's
    error was retried as an outage, 8 times."""
    with pytest.raises(UsageError, match="SSH key file /no/such/key does not exist"):
        open_remote(sftp_repo.url, key_file="/no/such/key", known_hosts=sftp_repo.options["known_hosts"],
                    transport=transport)


def test_an_ssh_configs_known_hosts_file_is_read_as_openssh_reads_it():
    from chunkvault.remotes.sftp import _config_known_hosts

    home = os.path.expanduser("~")
    assert _config_known_hosts('"/srv/my dir/kh" ~/.ssh/other', "h", "u") == "/srv/my dir/kh"
    assert _config_known_hosts("~/.ssh/known_hosts.d/%h-%u-100%%", "db.example", "backup") == \
        f"{home}/.ssh/known_hosts.d/db.example-backup-100%"
    assert _config_known_hosts("%d/kh", "h", "u") == f"{home}/kh"
    assert _config_known_hosts("none", "h", "u") == os.devnull
    with pytest.raises(UsageError, match="UserKnownHostsFile"):
        _config_known_hosts('"unclosed', "h", "u")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_ipv6_host_is_named_in_brackets_as_a_url_takes_it_again(transport):
    """`init` printed sftp://root@::1:2222/srv/repo, which the parser refuses."""
    with open_remote("sftp://me@[::1]:2222/srv/repo", transport=transport) as remote:
        assert remote.display_url == "sftp://me@[::1]:2222/srv/repo"
        with open_remote(remote.display_url, transport=transport) as again:
            assert again.display_url == remote.display_url


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_repository_is_made_inside_another(sftp_repo, password, transport):
    """As on local disk and S3: the outer repository took the inner one's objects for its own."""
    from chunkvault import Repository
    from chunkvault.errors import RepositoryExists

    options = dict(sftp_repo.options, transport=transport)
    Repository.init(sftp_repo.url + "/outer", password, kdf_seconds=0, **options).close()
    for below in ("/snapshots", "/data/ab/deeper"):
        with pytest.raises(RepositoryExists, match=f"lies inside the repository at {re.escape(sftp_repo.url)}/outer,"):
            Repository.init(sftp_repo.url + "/outer" + below, password, kdf_seconds=0, **options)
    assert not os.path.exists(os.path.join(sftp_repo.path, "outer", "snapshots"))
    Repository.init(sftp_repo.url + "/outer-beside", password, kdf_seconds=0, **options).close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_rewrite_on_the_servers_disk_changes_the_version_sftp_lists(sftp_repo, transport):
    """A maintenance job on the server rewrote a snapshot object by its local path, to the same size in the
    same second: SFTP's version (mtime in whole seconds, size) stayed, and another machine's cache served
    the old object (a tag it no longer had)."""
    import time

    from chunkvault.remotes.local import LocalRemote

    with open_remote(sftp_repo.url, **sftp_repo.options, transport=transport) as remote:
        while time.time() % 1 > 0.5:  # both writes in one second
            time.sleep(0.05)
        remote.put("snapshots/" + "ab" * 32, b"tag a")
        (before,) = remote.list("snapshots/")
        LocalRemote(sftp_repo.path).put("snapshots/" + "ab" * 32, b"tag b")
        (after,) = remote.list("snapshots/")
        assert after.version != before.version


def test_a_changed_host_key_in_the_default_known_hosts_is_named_with_a_command_that_runs(sshd, sftp_repo, tmp_path,
                                                                                         monkeypatch):
    """The default file is ~/.ssh/known_hosts: quoted whole, its tilde reached ssh-keygen -f unexpanded, which
    then found no such file; the command names the file as the shell would have expanded it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    known = tmp_path / ".ssh" / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(sshd.user_pub.split()[:2])}\n")
    with pytest.raises(PermissionDenied, match="does not match") as info:
        open_remote(sftp_repo.url, key_file=sshd.user_key, ssh_config=os.devnull, transport="paramiko")
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}' -f {known}," in str(info.value)


def test_a_revoked_host_key_is_refused_as_revoked_where_another_key_of_its_type_is_listed(sshd, sftp_repo, tmp_path,
                                                                                          transport):
    """The host's new key listed, its old (stolen) one revoked, and a server showing the old one: OpenSSH says
    revoked; paramiko compared it with the new key and called it a changed key, advising to remove the entry
    and accept the key shown, which is the revoked one."""
    known = tmp_path / "known_hosts"
    name = f"[127.0.0.1]:{sshd.port}"
    key, other = (" ".join(pub.split()[:2]) for pub in (sshd.host_pub, sshd.user_pub))
    lines = f"{name} {other}\n@revoked {name} {key}\n"
    known.write_text(lines)
    with pytest.raises(PermissionDenied, match=r"(?i)ed25519 SSH host key of 127\.0\.0\.1:\d+ is marked "
                                               f"@revoked in {known}") as info:
        open_remote(sftp_repo.url, key_file=sshd.user_key, known_hosts=str(known), transport=transport)
    assert "accept-new-host-key" not in str(info.value)
    assert known.read_text() == lines
