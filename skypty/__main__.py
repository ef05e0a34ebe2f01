from __future__ import annotations

import sys

from skypty.cli import main

sys.exit(main())
