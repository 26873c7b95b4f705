"""Requests a command makes to an off-site repository, counted in a real ``chunkvault serve``'s log: each
round trip made one after another costs a link's latency (20-80 ms off site), whatever the bandwidth."""
from __future__ import annotations

import re
import time

import pytest

from servers_http import FULL_TOKEN, http_server, serve_factory  # noqa: F401


def requests_logged(server, since: int = 0) -> list[str]:
    """The requests the server logged after the first ``since`` (``"GET config"``, ``"GET data/..."``, ...)."""
    time.sleep(0.2)  # each is logged once answered
    return re.findall(r"chunkvault serve: \S+ ([A-Z]+ \S+)", server.log())[since:]


@pytest.fixture
def served(http_server, cli, tmp_path):  # noqa: F811
    """(server, run): ``run(*args)`` runs a command against the served repository with a cache of its own."""
    env = {"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache")}

    def run(*args: str, **kwargs):
        return cli(args[0], "-r", http_server.url, *args[1:], env=env, **kwargs)

    run("init", "--kdf-time", "0")
    return http_server, run


def test_opening_a_repository_reads_its_config_once(served, tmp_path):
    """The config was read to report a damaged repository before the password, then again by the key's
    unlocking: a round trip more for every command."""
    server, run = served
    since = len(requests_logged(server))
    run("snapshots")
    assert requests_logged(server, since).count("GET config") == 1
