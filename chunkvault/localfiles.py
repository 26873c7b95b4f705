"""Reading this machine's own small files (cache entries, the ledger, the key kept ahead) without
waiting: a FIFO put in a file's place would hold ``open`` until a writer came, and each command that
read it would hang.  Anything but a regular file is an OSError, as an unreadable file is."""
from __future__ import annotations

import errno
import os
import stat


def read_regular(path: str, limit: int = -1) -> bytes:
    """The bytes of the regular file at ``path`` (at most ``limit``, when given); OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)


def user_dir(variable: str, default: str) -> str | None:
    """Where a per-user directory lies: ``$variable`` when it is an absolute path (a relative one is
    ignored, as the XDG base directory rules say: it would name another place in each working directory),
    else ``default`` below the home directory; None when there is no home directory (HOME unset or
    relative, and no password entry), where ``~`` used to become a directory of that name here."""
    value = os.environ.get(variable, "")
    if os.path.isabs(value):
        return value
    home = os.path.expanduser("~")
    return os.path.join(home, default) if os.path.isabs(home) else None
