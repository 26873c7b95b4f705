"""Object storage backends, chosen by URL. Knows nothing of chunks or crypto."""
from __future__ import annotations

from typing import Any

from chunkvault.errors import UsageError

from .base import ObjectInfo, Remote, validate_key

__all__ = ["ObjectInfo", "Remote", "open_remote", "validate_key"]


def open_remote(url: str, **options: Any) -> Remote:
    """Open the remote a URL names.

    ``/path`` and ``file:///path`` are local disk; ``s3://bucket/prefix``,
    ``sftp://user@host[:port]/path`` and ``http(s)://host[:port]/`` are the
    off-site remotes.  ``options`` are passed to the backend (e.g. S3 endpoint).
    """
    if not url:
        raise UsageError("no repository given (use -r/--repo or CHUNKVAULT_REPOSITORY)")
    scheme, sep, _ = url.partition("://")
    if not sep:
        scheme = "file"
    scheme = scheme.lower()
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
