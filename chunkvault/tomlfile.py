"""Reading a TOML settings file (a policy, a retention preset, the server's config): one UsageError line
naming the file for anything wrong with it, including bytes that are not UTF-8, which TOML requires."""
from __future__ import annotations

import tomllib
from typing import Any

from .errors import UsageError
from .localfiles import read_capped


#: The most a policy or config file holds: a device or a stream that never ends (/dev/zero) was read until
#: memory ran out, the command hanging meanwhile.
TOML_FILE_LIMIT = 16 << 20


def read_toml(path: str, what: str) -> dict[str, Any]:
    """The table in the file at ``path``; ``what`` names the file in errors ("policy", "config")."""
    try:
        with open(path, "rb") as f:
            data = read_capped(f, TOML_FILE_LIMIT, f"{what} {path} holds", f"no {what} file")
        config = tomllib.loads(data.decode())
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise UsageError(f"{what} {path} is not UTF-8 text (line {line})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid TOML: {exc}") from None
    where = _nul_at(config)
    if where is not None:
        raise UsageError(f"{what} {path}: {where} holds a NUL character (\\u0000), which no setting can hold")
    return config


def _nul_at(value: Any, where: str = "") -> str | None:
    """The dotted key (``source[2].paths[0]``) of the first key or string holding a NUL, or None.  TOML lets
    ``\\u0000`` through, but no path, command, URL or name can hold it: a path was an internal error
    ("embedded null byte") at the run that used it, or never (a state file with no check), an exclude
    pattern silently matched nothing."""
    if isinstance(value, str):
        return where if "\0" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key}" if where else str(key)
            if "\0" in key:
                return repr(inner)
            found = _nul_at(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _nul_at(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None
