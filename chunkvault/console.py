"""The ``chunkvault`` command's entry point.

Importing the command takes about a tenth of a second; a Ctrl-C, SIGTERM or SIGQUIT then
ended it with a traceback (or no word at all) instead of the line and exit code
it gives once running.  Nothing has been touched by then, so it stops at once.
"""
from __future__ import annotations

import os
import signal
import sys
from types import FrameType

_SAID = {signal.SIGINT: b"chunkvault: interrupted\n", signal.SIGTERM: b"chunkvault: terminated\n",
         signal.SIGHUP: b"chunkvault: hung up\n", signal.SIGQUIT: b"chunkvault: quit\n"}


def _stop_now(signum: int, frame: FrameType | None) -> None:
    os.write(2, _SAID[signum])
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
    from .cli import main as run  # installs its own handlers while the command runs

    return run()


if __name__ == "__main__":
    sys.exit(main())
