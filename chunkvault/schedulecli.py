"""The ``run`` and ``daemon`` commands' arguments, registered without importing the scheduler.

The scheduler brings TOML, time zones, retention and subprocess handling with
it, a tenth of a short command's start-up; only ``run`` and ``daemon`` need it.
"""
from __future__ import annotations

import argparse
from typing import Any


def _cmd_run(args: argparse.Namespace) -> int:
    from .scheduler import cmd_run

    return cmd_run(args)


def _cmd_daemon(args: argparse.Namespace) -> int:
    from .scheduler import cmd_daemon

    return cmd_daemon(args)


def add_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Register ``run`` and ``daemon`` on the chunkvault command line."""
    s = subparsers.add_parser("run", parents=[common_parent],
                              help="make the backups a policy file says are due now, then apply its retention")
    s.add_argument("--config", "-c", required=True, metavar="FILE", help="policy file (TOML)")
    s.add_argument("--dry-run", "-n", action="store_true", help="show what is due and what retention would remove")
    s.add_argument("--source", action="append", default=[], metavar="NAME", help="only this source (repeatable)")
    s.add_argument("--log", metavar="FILE", help="also append timestamped lines to this file")
    s.set_defaults(func=_cmd_run)

    s = subparsers.add_parser("daemon", parents=[common_parent],
                              help="keep running a policy file at its slots until SIGTERM")
    s.add_argument("--config", "-c", required=True, metavar="FILE", help="policy file (TOML)")
    s.add_argument("--log", metavar="FILE", help="append the log here instead of stderr")
    s.set_defaults(func=_cmd_daemon)
