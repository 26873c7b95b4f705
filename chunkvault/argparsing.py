"""What the command-line parsers of chunkvault and of ``chunkvault serve`` share beyond argparse."""
from __future__ import annotations

import argparse
from typing import Any, Callable


def dashes_value(parser: argparse.ArgumentParser, action: argparse.Action, arg_strings: list[str],
                 values: Callable[[argparse.Action, list[str]], Any]) -> Any:
    """``--wait=--``, ``-o--``: the option's value is ``--``, converted and checked as any other.  Python
    3.11's argparse takes that ``--`` for the end of the options, drops it and gives the option ``[]`` past
    its type and choices: a list where a string was promised (an internal error further on, or an option
    silently unset)."""
    if action.option_strings and action.nargs in (None, argparse.OPTIONAL) and arg_strings == ["--"]:
        value = parser._get_value(action, "--")
        parser._check_value(action, value)
        return value
    return values(action, arg_strings)
