"""-o SCHEME.NAME=VALUE: pure parsing, routed to the backend a URL names."""
import os
import re

import pytest

from chunkvault.errors import UsageError
from chunkvault.remotes import options_for_url, url_scheme


def test_scheme_of_urls():
    assert url_scheme("/srv/repo") == "file"
    assert url_scheme("relative/dir") == "file"
    assert url_scheme("S3://b/p") == "s3"
    assert url_scheme("https://h:6362/") == "https"


def test_options_go_to_their_backend_only():
    pairs = ["s3.storage-class=STANDARD_IA", "sftp.accept-new-host-key=yes", "http.token-file=/t",
             "s3.multipart-threshold=8388608", "sftp.connect-timeout=2.5", "s3.addressing-style=path"]
    assert options_for_url("s3://b/p", pairs) == {"storage_class": "STANDARD_IA", "multipart_threshold": "8388608",
                                                   "addressing_style": "path"}
    assert options_for_url("sftp://u@h/x", pairs) == {"accept_new_host_key": "yes", "connect_timeout": "2.5"}
    assert options_for_url("https://h/", pairs) == {"token_file": "/t"}
    assert options_for_url("/local", pairs) == {}
    assert options_for_url("/local", pairs + ["file.direct-io=no"]) == {"direct_io": "no"}
    assert options_for_url("http://h/", ["https.ca-file=/ca.pem", "http.x=no"]) == {"ca_file": "/ca.pem", "x": "no"}


@pytest.mark.parametrize("bad", ["noequals", "nodot=1", ".x=1", "s3.=1", "ftp.x=1", "s3.ca-file=", "s3.token-file= "])
def test_malformed_options_are_refused(bad):
    with pytest.raises(UsageError, match="bad remote option"):
        options_for_url("s3://b", [bad])


def test_values_are_the_text_typed_for_the_backend_to_read():
    got = options_for_url("http://h/", ["http.token=1e5", "http.ca-file=007", "http.read-timeout=5"])
    assert got == {"token": "1e5", "ca_file": "007", "read_timeout": "5"}


@pytest.mark.parametrize("option, words", [
    ("s3.region=1", "region_name '1' doesn't match"), ("s3.profile=2024", "AWS profile '2024'"), ("s3.region=yes", None),
    ("s3.storage-class=1", "unknown S3 storage class '1'"),
    ("s3.read-timeout=1e999", "S3 option read-timeout must be a number, not '1e999'"),
    ("s3.max-pool-connections=1_000_000", "S3 option max-pool-connections must be at most 1024"),
    ("file.fsync=1e3", "local repository option fsync takes yes or no, not '1e3'"),
    ("file.direct-io=1_0", "local repository option direct-io takes yes or no, not '1_0'"),
])
def test_an_option_is_read_as_typed_and_a_refusal_names_it_so(tmp_path, monkeypatch, option, words):
    """-o s3.region=1 and s3.profile=2024 (a profile's name may be a number) were converted to numbers the
    S3 client failed on: "internal error: TypeError"; a refusal named 1e3 as 1000.0."""
    from chunkvault.remotes import open_remote

    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    url = str(tmp_path) if option.startswith("file.") else "s3://bkt/repo"
    options = options_for_url(url, [option])
    if words is None:  # a name S3 takes as given
        remote = open_remote(url, endpoint_url="http://127.0.0.1:9", **options)
        assert remote.region == options["region"]
        return
    with pytest.raises(UsageError, match=re.escape(words)):
        open_remote(url, **({} if url == str(tmp_path) else {"endpoint_url": "http://127.0.0.1:9"}), **options)


@pytest.mark.parametrize("name, value", [("region", 1), ("profile", 2024), ("storage_class", True)])
def test_a_name_option_of_another_type_from_the_api_is_a_usage_error(name, value):
    from chunkvault.remotes import open_remote

    with pytest.raises(UsageError, match=f"S3 option {name.replace('_', '-')} must be text, not {value!r}"):
        open_remote("s3://bkt/repo", endpoint_url="http://127.0.0.1:9", **{name: value})


@pytest.mark.parametrize("url", ["http://[::1", "https://tok@[::1/", "s3://[bucket/p", "sftp://u@[::1/x"])
def test_a_url_the_parser_refuses_is_a_usage_error_that_does_not_echo_it(url):
    from chunkvault.remotes import open_remote

    with pytest.raises(UsageError, match="malformed .* repository URL") as info:
        open_remote(url)
    assert url not in str(info.value) and "tok" not in str(info.value)


@pytest.mark.parametrize("url", ["http://[::1]6362/", "https://[::1]x:6362/", "sftp://u@[::1]2222/srv/repo",
                                 "sftp://[fe80::1%25lo]22/x"])
def test_text_after_an_ipv6_address_other_than_a_port_is_refused(url):
    """The parser drops what follows ``]`` unless a ``:`` leads it: a port written without its colon was
    connected to as the scheme's default port (80, SSH's 22), with the URL shown without it."""
    from chunkvault.remotes import open_remote

    with pytest.raises(UsageError, match=r"after the IPv6 address .* write \[ADDRESS\]:PORT"):
        open_remote(url)


@pytest.mark.parametrize("url", ["s3:/bucket/x", "sftp:user@host:/srv/repo", "HTTP:host/", "file:/x", "rest:/srv/x"])
def test_a_scheme_without_slashes_is_a_usage_error_not_a_local_directory(url, tmp_path, monkeypatch, capsys):
    """restic's sftp:user@host:/path, or a URL missing its slashes, would otherwise make a directory of that
    name here and put the repository in it."""
    from chunkvault import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", "pw")
    assert cli.main(["init", "-r", url, "--kdf-time", "0"]) == 2
    assert "URL without '//'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["init", "-r", "./" + url, "--kdf-time", "0"]) == 0  # a directory of that name, when asked for


@pytest.mark.parametrize("option", ["http.token-file=", "sftp.key-file= ", "sftp.known-hosts=", "sftp.ssh-config="])
def test_an_empty_path_option_is_refused_not_taken_for_the_option_not_given(option):
    """``-o sftp.ssh-config=`` (an unset variable in a script) read ~/.ssh/config as if the option were absent."""
    url = "http://127.0.0.1:1/" if option.startswith("http") else "sftp://u@h/x"
    with pytest.raises(UsageError, match="an empty path names no file"):
        options_for_url(url, [option])


def test_the_cause_walk_ends_on_a_chain_that_comes_back_on_itself():
    from chunkvault.remotes.base import cause_of
    outer, inner = OSError("outer"), ValueError("inner")
    outer.__cause__, inner.__context__ = inner, outer
    assert cause_of(outer, KeyError) is None
    assert cause_of(outer, ValueError) is inner
    looped = OSError("self")
    looped.__cause__ = looped
    assert cause_of(looped, KeyError) is None
