"""Names and messages as text output shows them: one line each, nothing a terminal would act on.

A file name may hold any byte but ``/`` and NUL: a line break would split a
listing's entry in two, an escape sequence would be run by the operator's
terminal (colours, a moved cursor, a rewritten title), and bytes that are not
UTF-8 cannot be written to a strict UTF-8 stream at all.  So text output
shows them escaped, and ``--json`` gives names exactly (``path_b64``).

In a name: a backslash is ``\\\\``; tab, line feed and carriage return are
``\\t``, ``\\n``, ``\\r``; another C0 control or DEL is ``\\xHH``; a byte
that is not UTF-8 is ``\\xHH`` of that byte; a C1 control, a line or
paragraph separator or a bidirectional override is ``\\uHHHH``.  Every
name then shows as a different line, and the name can be read back from it.
Messages (errors, warnings) get the same escapes but for the backslash: they
stay one line, and a name inside them reads as in a listing unless it holds a
backslash (shown as itself there, so ``\\x41`` in a message may be four
characters of a name); ``--json`` lists are where names are exact.
"""
from __future__ import annotations

import os
import sys

_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
#: ``backup --list``'s letter for each change, as borg's ``create --list`` shows them.
LIST_LETTERS = {"added": "A", "modified": "M", "removed": "D", "unchanged": "U", "excluded": "x"}


def _escaped(ch: str) -> str | None:
    """The escape for one character of decoded text, or None when it shows as itself (backslash aside)."""
    o = ord(ch)
    if ch in _SHORT:
        return _SHORT[ch]
    if o < 0x20 or o == 0x7F:
        return f"\\x{o:02x}"
    if 0xDC80 <= o <= 0xDCFF:  # a byte that did not decode (os.fsdecode's surrogate escape)
        return f"\\x{o - 0xDC00:02x}"
    if 0x80 <= o <= 0x9F or 0x2028 <= o <= 0x202E or 0x2066 <= o <= 0x2069 or 0xD800 <= o <= 0xDFFF:
        return f"\\u{o:04x}"
    return None


def _escape(text: str, backslash: bool) -> str:
    if text.isprintable() and not (backslash and "\\" in text):  # the common case, at C speed
        return text
    out = []
    for ch in text:
        if ch == "\\" and backslash:
            out.append("\\\\")
        else:
            out.append(_escaped(ch) or ch)
    return "".join(out)


def shown_name(name: bytes | str) -> str:
    """A file name (bytes, or text from ``os.fsdecode``) as one line of printable text."""
    return _escape(os.fsdecode(name) if isinstance(name, bytes) else name, backslash=True)


def one_line(message: object) -> str:
    """A message (an error, a warning, a log line) as one line of printable text."""
    return _escape(str(message), backslash=False)


def warn(message: object, prefix: str = "warning: ") -> None:
    """A warning on standard error, one line, written whole (workers warn while the main thread prints)."""
    sys.stderr.write(f"{prefix}{one_line(message)}\n")
