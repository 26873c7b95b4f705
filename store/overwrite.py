"""What an in-place restore does with an entry the target already has (restic's ``--overwrite``): pure
decisions, no I/O, so the CLI can check a mode without loading the restore engine."""
from __future__ import annotations

import stat

from chunkvault.errors import UsageError

from .manifest import T_BLOCKDEV, T_CHARDEV, T_DIR, T_FIFO, T_FILE, T_HARDLINK, T_SYMLINK

# What an in-place restore does with an entry the target has (restic's ``--overwrite``): ``always`` replaces it,
# ``if-changed`` as ``delta`` (a file whose size and mtime are the snapshot's taken as right unread), ``if-newer``
# only where the snapshot's mtime is newer, ``never`` keeps it.  A kept entry keeps its content and metadata.
OVERWRITE_MODES = ("always", "if-changed", "if-newer", "never")
_KINDS = {T_FILE: stat.S_ISREG, T_HARDLINK: stat.S_ISREG, T_DIR: stat.S_ISDIR, T_SYMLINK: stat.S_ISLNK,
          T_FIFO: stat.S_ISFIFO, T_CHARDEV: stat.S_ISCHR, T_BLOCKDEV: stat.S_ISBLK}


def check_overwrite(mode: object, delete: bool = False) -> str:
    """``mode`` if it is one of OVERWRITE_MODES, else a UsageError; ``never`` with ``delete`` is one too: a
    restore that keeps everything the target has would delete what it has besides."""
    if mode not in OVERWRITE_MODES:
        raise UsageError(f"overwrite is one of {', '.join(OVERWRITE_MODES)}, not {mode!r}")
    if mode == "never" and delete:
        raise UsageError("overwrite never keeps everything the target has, and delete would remove what it has "
                         "besides: delete with if-newer, if-changed or always")
    return str(mode)


def keeps_existing(mode: str, entry_type: int, entry_mtime_ns: int, st_mode: int, st_mtime_ns: int) -> bool:
    """Whether ``mode`` leaves what the target has at an entry's path (``st_mode``, ``st_mtime_ns``, not
    followed) as it is: ``never`` always, ``if-newer`` unless it is of the entry's type and older than the
    entry.  A directory kept keeps its metadata; what lies below it is still restored."""
    if mode == "never":
        return True
    if mode != "if-newer":
        return False
    same = _KINDS.get(entry_type)
    return same is None or not same(st_mode) or entry_mtime_ns <= st_mtime_ns
