"""Object storage backends, chosen by URL. Knows nothing of chunks or crypto."""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

from chunkvault.errors import UsageError

from .base import ObjectInfo, Remote, text_after_bracket, validate_key

__all__ = ["ObjectInfo", "Remote", "check_url", "open_remote", "options_for_url", "url_scheme", "validate_key"]


def url_scheme(url: str) -> str:
    """The backend a URL names: file, s3, sftp, http or https."""
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else "file"


def options_for_url(url: str, pairs: list[str]) -> dict[str, Any]:
    """Turn ``-o SCHEME.NAME=VALUE`` pairs into the options of the backend ``url`` names.

    Options of other schemes are ignored (one command line may name repositories
    on several backends); ``https.x`` and ``http.x`` both reach the HTTP remote.
    Dashes in names become underscores.  Values stay the text typed: each backend reads its own (a
    number, a size, yes or no) and names it as typed when it refuses it; converted here, ``s3.region=1``
    or ``s3.profile=2024`` became a number the S3 client failed on (an internal error), and a refusal
    named ``1e3`` as 1000.0, ``1_000`` as 1000.
    """
    scheme = url_scheme(url)
    family = "http" if scheme == "https" else scheme
    out: dict[str, Any] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        target, dot, option = name.strip().partition(".")
        if not eq or not dot or not option or not target:
            raise UsageError(f"bad remote option {pair!r}: expected SCHEME.NAME=VALUE, e.g. s3.storage-class=STANDARD_IA")
        target = "http" if target.lower() == "https" else target.lower()
        if target not in ("file", "s3", "sftp", "http"):
            raise UsageError(f"bad remote option {pair!r}: unknown scheme {target!r}")
        if target == family:
            name = option.replace("-", "_")
            # (sftp.ssh-config as well: a path the CLI makes absolute too)
            if name.endswith(("_file", "_hosts", "_config")) and not value.strip():  # was taken for the option not given
                raise UsageError(f"bad remote option {pair!r}: an empty path names no file")
            out[name] = value
    return out


# Schemes of ours and of restic's repository strings: "NAME:" with no "//" after it is a mistyped URL (or
# restic's "sftp:user@host:/path"), not a local directory to be made beside the current one.
_URL_LIKE = re.compile(r"(?i)(file|s3|sftp|https?|rest|b2|gs|azure|swift|rclone):(?!//)")


def _refuse_scheme_without_slashes(url: str) -> None:
    m = _URL_LIKE.match(url)
    if m is None:
        return
    name = m.group(1).lower()
    forms = {"s3": "s3://bucket/prefix", "sftp": "sftp://user@host[:port]/path", "http": "http://host[:port]/",
             "https": "https://host[:port]/", "file": "file:///path or /path"}
    form = forms.get(name)
    hint = f"write {form}" if form else f"chunkvault has no {name!r} remote (s3://, sftp://, http(s)://, local paths)"
    raise UsageError(f"the repository looks like a {m.group(1)}: URL without '//': {hint} (for a local "
                     f"directory whose name begins {m.group(0)!r}, put ./ before it)")


SCHEMES = ("file", "s3", "sftp", "http", "https")


def check_url(url: str) -> str:
    """The scheme of a repository URL, after the checks that need no connection (a URL written in a
    configuration file is refused when the file is read, not at the first run that uses it)."""
    scheme = url_scheme(url)
    _refuse_scheme_without_slashes(url)
    if scheme not in SCHEMES:
        raise UsageError(f"unsupported repository URL scheme {scheme!r} in {url!r} "
                         "(s3://, sftp://, http(s)://, file:// or a local path)")
    if scheme != "file":
        try:
            netloc = urlparse(url).netloc
        except ValueError as exc:  # an unclosed [ (not echoed: the URL may hold a secret)
            raise UsageError(f"malformed {scheme} repository URL: {exc}") from None
        if text_after_bracket(netloc):  # not echoed either
            raise UsageError(f"malformed {scheme} repository URL: {text_after_bracket(netloc)!r} after the IPv6 "
                             "address where a port goes: write [ADDRESS]:PORT")
    return scheme


def open_remote(url: str, **options: Any) -> Remote:
    """Open the remote a URL names.

    ``/path`` and ``file:///path`` are local disk; ``s3://bucket/prefix``,
    ``sftp://user@host[:port]/path`` and ``http(s)://host[:port]/`` are the
    off-site remotes.  ``options`` are passed to the backend (e.g. S3 endpoint).
    """
    if not url:
        raise UsageError("no repository given (use -r/--repo or CHUNKVAULT_REPOSITORY)")
    scheme = check_url(url)
    if scheme == "file":
        from .local import LocalRemote

        return LocalRemote.from_url(url, **options)
    if scheme == "s3":
        from .s3 import S3Remote

        return S3Remote.from_url(url, **options)
    if scheme == "sftp":
        from .sftp import SFTPRemote

        return SFTPRemote.from_url(url, **options)
    if scheme in ("http", "https"):
        from .http import HTTPRemote

        return HTTPRemote.from_url(url, **options)
    raise UsageError(f"unsupported repository URL scheme {scheme!r} in {url!r}")
