"""Connecting to a repository's storage by URL, with the layers off-site remotes need.

Kept apart from the public API module so that a command can reach the
storage (and unlock the key) before the store's heavier modules are imported.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import time
import warnings
from typing import TYPE_CHECKING, Any

import blake3

from .errors import LocalCacheWarning, UsageError
from .localfiles import CACHEDIR_TAG, make_private_dirs, tag_as_cache, untag_as_cache, user_dir
from .remotes import Remote, open_remote
from .remotes.local import LocalRemote
from .remotes.throttle import ThrottledRemote

if TYPE_CHECKING:
    from .remotes.layer import StopRequest


#: Seconds an off-site remote that answered before is waited for when it stops answering (``-o SCHEME.retry-time``).
RETRY_TIME_ENV = "CHUNKVAULT_RETRY_TIME"
MAX_RETRY_TIME = 1e9


def connect(url: str | Remote, *, cache: bool = True, limit_upload: float | None = None,
            limit_download: float | None = None, retry_time: float | None = None,
            stop: StopRequest | None = None, **options: Any) -> Remote:
    """Open a remote by URL; off-site remotes get retries and a local metadata cache.  ``limit_upload`` and
    ``limit_download`` (bytes per second) hold its transfers to those rates (``remotes/throttle.py``);
    ``retry_time`` (else $CHUNKVAULT_RETRY_TIME, else 15 minutes) is how long one operation keeps retrying
    a remote that has answered before, and ``stop`` (else the process's) what ends the retries sooner
    (``remotes/layer.py``)."""
    if isinstance(url, Remote):
        return url
    if isinstance(url, (bytes, os.PathLike)):
        url = os.fsdecode(url)
    if not isinstance(url, str) or not url:
        raise UsageError(f"a repository is named by a URL or a path (str or bytes), not {url!r}")
    outage = _retry_time(retry_time)
    remote = open_remote(url, **options)
    local = isinstance(remote, LocalRemote)
    if limit_upload or limit_download:
        from .remotes.layer import stop_request

        remote = ThrottledRemote(remote, upload=limit_upload, download=limit_download,
                                 stop=stop if stop is not None else stop_request)
    if local:
        if retry_time is not None:
            raise UsageError("retry-time applies to off-site remotes: a local repository is not retried")
        return remote
    from .remotes.layer import wrap_remote  # off-site remotes only

    base = cache_base() if cache else None
    cache_dir = os.path.join(base, url_digest(remote.display_url)) if base is not None else None
    if base is not None and cache_dir is not None:
        use_cache_dir(base, cache_dir)
    return wrap_remote(remote, cache_dir=cache_dir, stop=stop, **({} if outage is None else {"outage": outage}))


def _retry_time(given: Any) -> float | None:
    """The retry time given (option, else environment), checked; None: the default."""
    text, what = (given, "retry-time") if given is not None else (os.environ.get(RETRY_TIME_ENV), RETRY_TIME_ENV)
    if text is None or text == "":
        return None
    try:
        seconds = float(text)
    except (TypeError, ValueError):
        seconds = -1.0
    # At most about 31 years: 1e300 was taken, and each retry's message then said "giving up in" a number of
    # minutes 299 digits long.
    if isinstance(text, bool) or not 0 <= seconds <= MAX_RETRY_TIME:
        raise UsageError(f"{what} takes seconds (0 to {MAX_RETRY_TIME:.0f}), not {text!r}")
    return seconds


NO_CACHE_ENV = "CHUNKVAULT_NO_CACHE"  # 1 or yes: no local cache, as --no-cache; "", 0 or no: a cache


def _no_cache_wanted() -> bool:
    """``CHUNKVAULT_NO_CACHE`` read as the switches of ``-o`` are: any value but "" and "0" was taken as
    set, so ``CHUNKVAULT_NO_CACHE=no`` (or ``false``) turned the cache off; a typo is refused."""
    from .remotes.base import yes_no_option

    return yes_no_option("", NO_CACHE_ENV, os.environ.get(NO_CACHE_ENV, ""))


def cache_base() -> str | None:
    """The local cache's directory; None when there is none to use (no home directory, none wanted:
    ``CHUNKVAULT_NO_CACHE``, or the one given is no writable directory, which is warned of once):
    commands then read everything from the repository."""
    if _no_cache_wanted():
        return None
    base = os.environ.get("CHUNKVAULT_CACHE_DIR")
    if not base:
        home_cache = user_dir("XDG_CACHE_HOME", ".cache")
        if home_cache is None:
            return None
        base = os.path.join(home_cache, "chunkvault")
    elif not _usable(base):  # one given: a cache that silently never fills is a surprise, so say it once
        if base not in _said_unusable:
            _said_unusable.add(base)
            warnings.warn(f"cache directory {base} is not a writable directory: nothing is cached locally, "
                          "every object is read from the repository", LocalCacheWarning, stacklevel=3)
        return None
    if _cache_entries(base) is not None:  # it holds copies of metadata and key files: no backup should take them
        tag_as_cache(base)
    else:  # tagged by an earlier chunkvault, which tagged any --cache-dir (a home directory)
        untag_as_cache(base)
    return base


def _cache_entries(base: str) -> list[str] | None:
    """The names in ``base`` where it holds nothing but the cache's own entries ([] where it is not made yet),
    else None: only such a directory is tagged as a cache, or has entries removed.  ``--cache-dir ~`` tagged
    the home directory, and every backup with ``--exclude-caches`` (chunkvault's, restic's, borg's, tar's)
    then left all of it out."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return names if all(map(_is_cache_entry, names)) else None


def _is_cache_entry(name: str) -> bool:
    """Whether ``name`` in the cache's directory is one the cache makes (a repository's, the keys kept ahead,
    the tag or the tag's temporary file)."""
    return bool(_CACHE_DIR_NAME.fullmatch(name)) or name in _CACHE_ENTRIES or name.startswith(_TAG_NAME + ".")


_said_unusable: set[str] = set()


def _usable(directory: str) -> bool:
    """Whether ``directory`` is (or can be made) a directory this process can write in."""
    try:
        make_private_dirs(directory)
    except OSError:
        return False
    return os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)


#: Seconds after which a repository's cache directory no command used is removed (restic's age too).
CACHE_UNUSED_AFTER = 30 * 86400.0
_CACHE_DIR_NAME = re.compile(r"[0-9a-f]{24}")  # ``url_digest``'s
_TAG_NAME = os.fsdecode(CACHEDIR_TAG[0])
_KEY_AHEAD = "key-ahead"
_CACHE_ENTRIES = frozenset({_TAG_NAME, _KEY_AHEAD})  # and the repositories' directories, and the tag's temp file


def use_cache_dir(base: str, cache_dir: str) -> None:
    """Mark ``cache_dir`` used now (its mtime), and remove the repositories' cache directories beside it in
    ``base`` that no command used for ``CACHE_UNUSED_AFTER``: each is named by its URL, so that of a
    repository deleted, moved to another URL or a one-off copy's target otherwise stayed for ever.  Best
    effort; only directories named as ``url_digest`` names them, never through a symbolic link, and none in a
    directory that holds anything else than the cache (a ``--cache-dir`` given where other files are)."""
    try:
        os.utime(cache_dir)
    except OSError:  # not made yet: its first entry makes it
        pass
    names = _cache_entries(base)
    if not names:
        return
    now = time.time()
    for name in names:
        path = os.path.join(base, name)
        if path == cache_dir or not _CACHE_DIR_NAME.fullmatch(name):
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and now - st.st_mtime > CACHE_UNUSED_AFTER:
            shutil.rmtree(path, ignore_errors=True)


def url_digest(url: str) -> str:
    return blake3.blake3(url.encode()).hexdigest()[:24]


def key_ahead_dir() -> str | None:
    """Where the key files that last opened each repository are kept (store/keyahead.py)."""
    base = cache_base()
    return None if base is None else os.path.join(base, _KEY_AHEAD)


def key_ahead_path(url: str) -> str | None:
    """Where the key file that last opened the repository at ``url`` (as given) is kept (store/keyahead.py)."""
    directory = key_ahead_dir()
    return None if directory is None else os.path.join(directory, url_digest(url))
