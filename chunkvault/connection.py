"""Connecting to a repository's storage by URL, with the layers off-site remotes need.

Kept apart from the public API module so that a command can reach the
storage (and unlock the key) before the store's heavier modules are imported.
"""
from __future__ import annotations

import os
from typing import Any

import blake3

from .remotes import Remote, open_remote
from .remotes.layer import wrap_remote
from .remotes.local import LocalRemote


def connect(url: str | Remote, *, cache: bool = True, **options: Any) -> Remote:
    """Open a remote by URL; off-site remotes get retries and a local metadata cache."""
    if isinstance(url, Remote):
        return url
    remote = open_remote(url, **options)
    if isinstance(remote, LocalRemote):
        return remote
    cache_dir = None
    if cache:
        base = os.environ.get("CHUNKVAULT_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chunkvault")
        cache_dir = os.path.join(base, blake3.blake3(remote.display_url.encode()).hexdigest()[:24])
    return wrap_remote(remote, cache_dir=cache_dir)
