"""Transports: listen, dial, and hand authenticated byte streams to the mux."""
from __future__ import annotations

__all__: list = []
