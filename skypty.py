#!/usr/bin/env python3
"""Entry script: `python skypty.py …` runs the skypty command tree."""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))
if _HERE not in sys.path:   # run as a script it is sys.path[0] already: a second copy costs every import a search
    sys.path.insert(0, _HERE)

from skypty.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
