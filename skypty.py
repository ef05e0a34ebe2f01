#!/usr/bin/env python3
"""Entry script: `python skypty.py …` runs the skypty command tree."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from skypty.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
