"""Where a password comes from: a file, a command, the environment or the terminal.

Every password a command takes (the repository's, a second repository's, a new key's, an export's)
is read by the same rules, so each offers the same choices and fails with the same messages:
``--<name>-file``, ``--<name>-command``, then ``CHUNKVAULT_<NAME>_FILE``, ``CHUNKVAULT_<NAME>_COMMAND``,
``CHUNKVAULT_<NAME>``, then a prompt when stdin is a terminal. A command lets the password live in a
secret manager (``pass``, ``gpg``, a vault client) instead of a file or the environment.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UsageError, process_end
from .localfiles import capped, read_capped

if TYPE_CHECKING:
    import subprocess


@dataclass(frozen=True)
class PasswordSource:
    """One password a command may take; ``name`` gives its options and environment variables."""

    name: str  # "password", "to-password", ...
    what: str  # how messages and the prompt call it

    @property
    def option(self) -> str:
        return "--" + self.name

    @property
    def env(self) -> str:
        return "CHUNKVAULT_" + self.name.upper().replace("-", "_")

    def _args(self, args: argparse.Namespace, kind: str) -> str | None:
        return getattr(args, f"{self.name.replace('-', '_')}_{kind}", None)

    def add_options(self, parser: argparse.ArgumentParser | argparse._ActionsContainer, about: str) -> None:
        """``--<name>-file`` and ``--<name>-command`` (``about``: whose password it is)."""
        parser.add_argument(f"{self.option}-file", metavar="FILE",
                            help=f"read {about} from FILE (or {self.env}_FILE, or {self.env})")
        parser.add_argument(f"{self.option}-command", metavar="COMMAND",
                            help=f"run COMMAND (split like a shell line, no shell) and take {about} from its "
                                 f"output (or {self.env}_COMMAND)")

    def given(self, args: argparse.Namespace, fallback: tuple[str | None, str | None] = (None, None),
              cwd: str | None = None) -> bytes | None:
        """The password from an option, else ``fallback`` (a policy's file and command; a command runs
        in ``cwd``), else the environment; None when none of them gives one."""
        for kind in ("file", "command"):
            if self._args(args, kind) == "":  # given, and empty: not the environment's password silently instead
                raise UsageError(f"{self.option}-{kind} is empty")
        pw = (self._read(self._args(args, "file"), self._args(args, "command"),
                         f"{self.option}-file and {self.option}-command")
              or self._read(*fallback, "password-file and password-command", cwd))
        if pw is not None:
            return pw
        file, command = os.environ.get(self.env + "_FILE"), os.environ.get(self.env + "_COMMAND")
        for kind, value in (("FILE", file), ("COMMAND", command)):
            if value == "":  # a unit file's unset variable, say: no password either, not a reason to look on
                raise UsageError(f"{self.env}_{kind} is set but empty")
        pw = self._read(file, command, f"{self.env}_FILE and _COMMAND")
        if pw is None and self.env in os.environ:
            return self._nonempty(os.fsencode(os.environ[self.env]), f"in {self.env}")  # its bytes, as a file gives
        return pw

    def _read(self, file: str | None, command: str | None, where: str, cwd: str | None = None) -> bytes | None:
        """The password in ``file`` or from ``command`` (one of them at most), None when neither is given."""
        if file and command:
            raise UsageError(f"{where} both given: use one")
        if file:
            return self._nonempty(read_password_file(file), f"in {file}")
        if command:
            return self._nonempty(run_password_command(command, cwd), f"from `{command}`")
        return None

    def get(self, args: argparse.Namespace, *, confirm: bool = False,
            fallback: tuple[str | None, str | None] = (None, None), cwd: str | None = None) -> bytes:
        """The password from :meth:`given`, else asked on the terminal (twice when ``confirm``)."""
        pw = self.given(args, fallback, cwd)
        if pw is not None:
            return pw
        if sys.stdin is None or not sys.stdin.isatty():  # None: started with it closed (<&-)
            raise UsageError(f"no {self.what}: use {self.option}-file or {self.option}-command, "
                             f"or set {self.env}_FILE, {self.env}_COMMAND or {self.env}")
        try:
            typed = prompt(f"{self.what}: ", confirm)
        except EOFError:  # Ctrl-D
            print(file=sys.stderr)
            raise UsageError(f"no {self.what}: the prompt's input ended") from None
        return self._nonempty(typed, "at the prompt")

    def _nonempty(self, pw: bytes, where: str) -> bytes:
        if not pw:
            raise UsageError(f"the {self.what} {where} is empty")
        return pw


REPOSITORY = PasswordSource("password", "repository password")
NEW = PasswordSource("new-password", "new password")
FROM = PasswordSource("from-password", "password of the from repository")
TO = PasswordSource("to-password", "password of the to repository")
EXPORT = PasswordSource("export-password", "export password")


#: The most a password file holds: a device or a stream that never ends (/dev/zero, /dev/urandom) was read
#: until memory ran out, the command hanging meanwhile.
PASSWORD_FILE_LIMIT = 1 << 20


def read_password_file(path: str) -> bytes:
    """A file's bytes without its trailing line breaks (LF or CR LF); spaces are the password's."""
    try:
        with open(path, "rb") as f:
            data = read_capped(f, PASSWORD_FILE_LIMIT, f"password file {path} holds", "no password file")
    except OSError as exc:
        raise UsageError(f"cannot read password file {path}: {exc.strerror}") from None
    return data.rstrip(b"\r\n")


def run_password_command(command: str, cwd: str | None = None) -> bytes:
    """The command's standard output without its trailing line breaks. It keeps the terminal and
    stderr, so a command that asks for a passphrase (gpg's pinentry, a vault login) can; a standard input
    that is no terminal is not its to read (``backup --stdin``'s data, ``key import -``'s export): it
    reads nothing there."""
    import shlex
    import subprocess

    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise UsageError(f"cannot parse password command `{command}`: {exc}") from None
    if not argv:
        raise UsageError("empty password command")
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=cwd,
                                stdin=None if os.isatty(0) else subprocess.DEVNULL)
    except OSError as exc:
        raise UsageError(f"cannot run password command `{command}`: {exc.strerror}") from None
    with proc:
        assert proc.stdout is not None
        try:
            output = _output_until_exit(proc, PASSWORD_FILE_LIMIT + 1)  # as a password file's: `yes` filled memory
        except BaseException:  # a stop: not left running, as subprocess.run leaves none
            proc.kill()
            raise
        if len(output) > PASSWORD_FILE_LIMIT:
            proc.kill()
        proc.stdout.close()  # what it writes still (a child of its own) ends on a broken pipe
        returncode = proc.wait()
    capped(output, PASSWORD_FILE_LIMIT, f"password command `{command}` printed", "no password")
    if returncode != 0:
        raise UsageError(f"password command `{command}` {process_end(returncode)}")
    return output.rstrip(b"\r\n")


def _output_until_exit(proc: "subprocess.Popen[bytes]", limit: int) -> bytes:
    """What ``proc`` writes to its standard output until it exits (or ``limit`` bytes), and what it left in the
    pipe.  Not until the pipe's end: a process it started that keeps the pipe (an agent it launches, ``cmd &``)
    held the password back until that process ended too."""
    import select

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    output = bytearray()
    while len(output) < limit:
        ended = proc.poll() is not None  # before the look: what it wrote before it ended is in the pipe by then
        if not select.select([fd], [], [], 0 if ended else 0.1)[0]:
            if ended:
                break
            continue
        piece = os.read(fd, limit - len(output))
        if not piece:
            break
        output += piece
    return bytes(output)


def prompt(text: str, confirm: bool) -> bytes:
    pw = _typed(text)
    if confirm and _typed("enter it again: ") != pw:
        raise UsageError("passwords do not match")
    return pw


def _typed(text: str) -> bytes:
    """One line typed at the terminal without echo, as its bytes (as a password file gives them): getpass
    decodes the line, and a byte that is not UTF-8 (a Latin-1 terminal's, a password kept in a file before)
    stopped the command with an internal error. EOFError when the input ends before a line does."""
    import getpass
    import termios

    try:
        fd = out = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:  # no controlling terminal (a session of its own): standard input's, asked on stderr,
        if not os.isatty(0):  # as getpass does; it decoded that line too
            return os.fsencode(getpass.getpass(text))
        fd, out = os.dup(0), sys.stderr.fileno()
    try:
        old = termios.tcgetattr(fd)
        quiet = list(old)
        quiet[3] &= ~termios.ECHO
        try:  # as getpass: a stop (a Ctrl-C as the prompt is written) gives the terminal its echo back
            termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)  # before the prompt: what is typed after it stays
            os.write(out, text.encode())
            line = b""
            while not line.endswith(b"\n"):
                piece = os.read(fd, 4096)
                if not piece:
                    break
                line += piece
        finally:
            termios.tcsetattr(fd, termios.TCSAFLUSH, old)
            os.write(out, b"\n")
    finally:
        os.close(fd)
    if not line:
        raise EOFError
    return line[:-1] if line.endswith(b"\n") else line
