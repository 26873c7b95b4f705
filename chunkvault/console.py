"""The ``chunkvault`` command's entry point.

Importing the command takes about a tenth of a second; a Ctrl-C, SIGTERM or SIGQUIT then
ended it with a traceback (or no word at all) instead of the line and exit code
it gives once running.  Nothing has been touched by then, so it stops at once, with ``--json`` printing
the error document a later stop prints too (a program reading stdout found it empty).
"""
from __future__ import annotations

import os
import signal
import sys
from types import FrameType

#: What a command stopped by each signal says (and a scheduled run's hooks are told).
STOP_WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up",
              signal.SIGQUIT: "quit"}
_SAID = {signum: f"chunkvault: {word}\n".encode() for signum, word in STOP_WORDS.items()}


def stopped_as(signum: int) -> tuple[str, int, str]:
    """(error type, exit code, message) of a command ``signum`` stopped, as its line and ``--json`` say them."""
    word = STOP_WORDS[signum]
    return word.title().replace(" ", ""), 128 + signum, word


def _error_document(signum: int) -> bytes:
    """The ``--json`` document of a command stopped by ``signum``, as ``cli`` prints it (indent 1, keys sorted),
    written out by hand: the json module is not loaded yet."""
    kind, code, word = stopped_as(signum)
    return f'{{\n "error": {{\n  "exit_code": {code},\n  "message": "{word}",\n  "type": "{kind}"\n }}\n}}\n'.encode()


_loading = [True]  # the command has not begun: once it has, it prints its own document (then one is too many)


def begun() -> None:
    """The command's own stop handlers are in (``cli.main``): a stop from now on prints its document, so the
    handler here, once they are gone again, prints none.  Not at the end of the import: a stop before they
    were in (the allocator tuned, the output wrapped) printed no document at all."""
    _loading[0] = False


def _stop_now(signum: int, frame: FrameType | None) -> None:
    os.write(2, _SAID[signum])
    words = sys.argv[1:]
    own = words[:words.index("--")] if "--" in words else words  # not a --stdin-from-command's
    if _loading[0] and "--json" in own:
        try:
            os.write(1, _error_document(signum))
        except OSError:
            pass  # no standard output: the line on stderr says it
    os._exit(128 + signum)


def version_line() -> str:
    from . import __version__

    return f"chunkvault {__version__}"


def main() -> int:
    if sys.argv[1:] == ["--version"]:  # what installers and scripts ask: answered without loading the command
        try:
            os.write(1, f"{version_line()}\n".encode())
            return 0
        except OSError:
            pass  # output closed or full: the command says so as it does for any output
    for signum in _SAID:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # a hangup `nohup` ignores stays ignored
            signal.signal(signum, _stop_now)
    from .cli import main as run  # installs its own handlers while the command runs (and calls ``begun``)

    return run()


if __name__ == "__main__":
    sys.exit(main())
