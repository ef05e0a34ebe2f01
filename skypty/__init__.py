"""skypty: the Skywire pty subsystem (remote shell, exec, fs, web terminal) in Python."""
from __future__ import annotations

__version__ = "0.1.0"
