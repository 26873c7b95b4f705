"""What OpenSSH's client printed, sorted into chunkvault's errors; the command line it is started with."""
from __future__ import annotations

import pytest

from chunkvault.errors import PermissionDenied, RemoteError, RemoteUnavailable, UsageError
from chunkvault.remotes.sftp_sessions import SSHTarget, classify_ssh_failure, openssh_command

TARGET = SSHTarget("backup.example", 2222, "backup", ("/keys/id",), "/etc/kh", False, None, 15.0)

# As OpenSSH 9 prints them (LogLevel=ERROR, BatchMode=yes), with its CR LF line ends.
UNKNOWN = ("No ED25519 host key is known for [backup.example]:2222 and you have requested strict checking.\r\n"
           "Host key verification failed.\r\n")
CHANGED = ("@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
           "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\n"
           "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
           "IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\r\n"
           "The fingerprint for the ED25519 key sent by the remote host is\n"
           "SHA256:cE+KPNI6TU5W2mgCaD1B7r3UQ5y6sA6oJL3SUJIZmHA.\r\n"
           "Please contact your system administrator.\r\n"
           "Add correct host key in /etc/kh to get rid of this message.\r\n"
           "Offending ED25519 key in /etc/kh:3\r\n"
           "  remove with:\r\n"
           "  ssh-keygen -f \"/etc/kh\" -R \"[backup.example]:2222\"\r\n"
           "Host key for [backup.example]:2222 has changed and you have requested strict checking.\r\n"
           "Host key verification failed.\r\n")

REVOKED = ("@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
           "@       WARNING: REVOKED HOST KEY DETECTED!               @\r\n"
           "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
           "The ED25519 host key for [backup.example]:2222 is marked as revoked.\r\n"
           "ED25519 host key for [backup.example]:2222 was revoked and you have requested strict checking.\r\n"
           "Host key verification failed.\r\n")

@pytest.mark.parametrize("stderr, kind, words", [
    (UNKNOWN, PermissionDenied, ["unknown SSH host key for backup.example:2222 (ED25519 key)", "/etc/kh",
                                 "ssh-keyscan"]),
    (CHANGED, PermissionDenied, ["does not match /etc/kh",
                                 "ED25519 SHA256:cE+KPNI6TU5W2mgCaD1B7r3UQ5y6sA6oJL3SUJIZmHA",
                                 "old one is at /etc/kh:3", "ssh-keygen -R '[backup.example]:2222' -f /etc/kh",
                                 "-o sftp.accept-new-host-key=yes"]),
    (REVOKED, PermissionDenied, ["ED25519 SSH host key of backup.example:2222 is marked @revoked in /etc/kh"]),
    ("root@backup.example: Permission denied (publickey).\r\n", PermissionDenied,
     ["authentication as 'root' to backup.example:2222 failed"]),
    ("Received disconnect from 10.0.0.1 port 2222:2: Too many authentication failures\r\n", PermissionDenied,
     ["authentication as 'backup'"]),
    ("ssh: connect to host backup.example port 2222: Connection refused\r\n", RemoteUnavailable,
     ["cannot connect to SSH server backup.example:2222: connect to host backup.example port 2222: "
      "Connection refused"]),
    ("ssh: Could not resolve hostname backup.example: Name or service not known\r\n", RemoteUnavailable,
     ["Could not resolve hostname"]),
    ("kex_exchange_identification: Connection closed by remote host\r\n", RemoteUnavailable,
     ["Connection closed by remote host"]),
    ("subsystem request failed on channel 0\r\n", RemoteError, ["no SFTP subsystem"]),
    # ~/.ssh/config writable by group or others: ssh stops before connecting, every attempt alike
    ("Bad owner or permissions on /home/backup/.ssh/config\r\n", UsageError,
     ["ssh refuses its configuration: Bad owner or permissions on /home/backup/.ssh/config"]),
    ("", RemoteUnavailable, ["the ssh client exited"]),
])
def test_what_ssh_printed_becomes_one_clear_error(stderr, kind, words):
    error = classify_ssh_failure(stderr, TARGET)
    assert type(error) is kind
    message = str(error)
    assert "\n" not in message and "\r" not in message
    for word in words:
        assert word in message


def test_unknown_host_without_a_known_hosts_option_names_the_files_ssh_reads(tmp_path):
    target = SSHTarget("h", None, None, (), None, False, None, 15.0)
    assert "/.ssh/known_hosts or " in str(classify_ssh_failure(UNKNOWN, target))  # ssh's home: the account's
    config = tmp_path / "config"
    config.write_text(f"Host h\n  UserKnownHostsFile {tmp_path}/trusted\n")
    target = SSHTarget("h", None, None, (), None, False, str(config), 15.0)
    assert f"not in {tmp_path}/trusted;" in str(classify_ssh_failure(UNKNOWN, target))
    assert f"does not match {tmp_path}/trusted " in str(classify_ssh_failure(CHANGED, target))


def test_command_asks_nothing_forwards_nothing_and_checks_host_keys():
    cmd = openssh_command(TARGET)
    assert cmd[0] == "ssh" and cmd[-4:] == ["-s", "--", "backup.example", "sftp"]
    options = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-o"]
    assert "BatchMode=yes" in options and "StrictHostKeyChecking=yes" in options
    assert 'UserKnownHostsFile="/etc/kh"' in options and "ConnectTimeout=15" in options
    assert ["-p", "2222"] == cmd[cmd.index("-p"):cmd.index("-p") + 2]
    assert ["-l", "backup"] == cmd[cmd.index("-l"):cmd.index("-l") + 2]
    assert {"-x", "-a", "-T"} <= set(cmd)


def test_command_leaves_to_the_ssh_config_what_the_url_does_not_say():
    target = SSHTarget("alias", None, None, (), None, True, None, 0.2)
    cmd = openssh_command(target)
    assert "-p" not in cmd and "-l" not in cmd and "-i" not in cmd and "-F" not in cmd
    assert "StrictHostKeyChecking=accept-new" in cmd and "ConnectTimeout=1" in cmd
    assert not any(arg.startswith("UserKnownHostsFile") for arg in cmd)


def test_paths_are_quoted_and_escaped_from_ssh_tokens():
    target = SSHTarget("h", None, None, ("/keys/100%/id",), "/my known/%hosts", False, "/cfg", 15.0)
    cmd = openssh_command(target)
    assert 'UserKnownHostsFile="/my known/%%hosts"' in cmd
    assert 'IdentityFile="/keys/100%%/id"' in cmd and "-i" not in cmd
    assert cmd[cmd.index("-F") + 1] == "/cfg"


def test_a_host_that_looks_like_an_option_stays_a_host():
    cmd = openssh_command(SSHTarget("-oProxyCommand=evil", None, None, (), None, False, None, 15.0))
    assert cmd[cmd.index("--") + 1] == "-oProxyCommand=evil"


def test_a_channel_the_server_refuses_leaves_the_connection_s_other_sessions_working(tmp_path):
    """Past the server's MaxSessions, a new channel is refused: that one fails, and the sessions already
    open on the connection go on (the whole connection was dropped under them)."""
    from chunkvault.remotes.sftp_sessions import ParamikoSessions
    from servers_ssh import SSHServer, require_sshd

    require_sshd()
    server = SSHServer(str(tmp_path), max_sessions=1)
    server.start()
    try:
        target = SSHTarget("127.0.0.1", server.port, server.user, (server.user_key,), server.known_hosts,
                           False, None, 10.0)
        sessions = ParamikoSessions(target)
        first = sessions.open()
        (tmp_path / "f").write_bytes(b"hello")
        with pytest.raises(RemoteUnavailable):
            sessions.open()
        assert sessions.alive(first) and first.read_file(str(tmp_path / "f")) == b"hello"
        sessions.close()
    finally:
        server.stop()
