from __future__ import annotations

import sys

from skypty.cli import run

sys.exit(run())
