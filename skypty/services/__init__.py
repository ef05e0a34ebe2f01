"""The host side of each mux URI. Services never know which transport carries them."""
from __future__ import annotations

__all__: list = []
