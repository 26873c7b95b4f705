"""``python -m chunkvault``: the ``chunkvault`` command, with the console script's early signal handling."""
from __future__ import annotations

import sys

from .console import main

if __name__ == "__main__":  # not when merely imported (a tool walking the package's modules)
    sys.exit(main())
