"""Names and messages in text output: one printable line each, and a name can be read back exactly."""
import os
import re

import pytest
from hypothesis import given, strategies as st

from chunkvault.display import one_line, shown_name

_ESCAPE = re.compile(r"\\(\\|t|n|r|x[0-9a-f]{2}|u[0-9a-f]{4})")
_SHORT = {"\\": b"\\", "t": b"\t", "n": b"\n", "r": b"\r"}


def read_back(shown: str) -> bytes:
    """The bytes of the name ``shown`` stands for, by the escapes display.py documents."""
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(shown):
        assert "\\" not in shown[pos:m.start()], "a backslash that starts no escape"
        out += shown[pos:m.start()].encode("utf-8")
        code = m.group(1)
        if code in _SHORT:
            out += _SHORT[code]
        elif code[0] == "x":
            out.append(int(code[1:], 16))
        else:
            out += chr(int(code[1:], 16)).encode("utf-8", "surrogatepass")
        pos = m.end()
    assert "\\" not in shown[pos:]
    out += shown[pos:].encode("utf-8")
    return bytes(out)


def assert_one_printable_line(text: str) -> None:
    for ch in text:
        o = ord(ch)
        assert not (o < 0x20 or o == 0x7F or 0x80 <= o <= 0x9F), f"control character {o:#x} in {text!r}"
        assert not 0xD800 <= o <= 0xDFFF, f"surrogate {o:#x} in {text!r}"
        assert not (0x2028 <= o <= 0x202E or 0x2066 <= o <= 0x2069), f"separator or override {o:#x} in {text!r}"
    text.encode("utf-8")  # writable to a strict UTF-8 stream


@pytest.mark.parametrize("name, shown", [
    (b"plain.txt", "plain.txt"),
    ("\u00e9t\u00e9 \u65e5\u672c.txt".encode(), "\u00e9t\u00e9 \u65e5\u672c.txt"),
    (b"new\nline", "new\\nline"),
    (b"tab\there\r", "tab\\there\\r"),
    (b"esc\x1b[31mred", "esc\\x1b[31mred"),
    (b"del\x7f", "del\\x7f"),
    (b"caf\xe9", "caf\\xe9"),
    ("c1\u0085".encode(), "c1\\u0085"),
    ("rtl\u202egnp.exe".encode(), "rtl\\u202egnp.exe"),
    (b"back\\slash", "back\\\\slash"),
    (b"back\\x1b", "back\\\\x1b"),
])
def test_names_show_escaped(name, shown):
    assert shown_name(name) == shown
    assert shown_name(os.fsdecode(name)) == shown
    assert read_back(shown) == name


def test_messages_stay_one_line_and_keep_backslashes():
    assert one_line("cannot read a\nb: No such file") == "cannot read a\\nb: No such file"
    assert one_line(ValueError("x\x1b]0;title\x07")) == "x\\x1b]0;title\\x07"
    assert one_line("C:\\path and caf" + os.fsdecode(b"\xe9")) == "C:\\path and caf\\xe9"
    assert one_line("nothing to escape") == "nothing to escape"


@given(st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b and b"/" not in b))
def test_any_name_shows_as_one_line_that_reads_back(name):
    shown = shown_name(name)
    assert_one_printable_line(shown)
    assert read_back(shown) == name


@given(st.text(max_size=40))
def test_any_message_is_one_printable_line(text):
    assert_one_printable_line(one_line(text))
