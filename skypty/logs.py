"""Loggers of the client path that import `logging` only when something is logged.

A one-shot client verb (exec, shell) usually logs nothing, and `logging` with what it pulls in
(traceback, linecache, tokenize, string, weakref) is ~2 ms of its cold start. Modules on that
path (cli, client, rpc, mux, noise) take their logger from `get_logger`; host-only modules use
`logging` directly. `setup` is the one place that configures output: servers apply it at once,
client verbs when their first record comes.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

__all__ = ["get_logger", "setup"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_level: Optional[str] = None   # asked for by setup(), applied before the first record


def setup(level: Optional[str], now: bool = True) -> None:
    """Log to stderr at `level` ("debug", "info", "warn"/"warning", "error"; default info).
    With now=False it is applied when a skypty logger is first used (or at once if
    something has imported `logging` already)."""
    global _level
    _level = level or "info"
    if now or "logging" in sys.modules:
        _apply()


def _apply() -> None:
    import logging

    name = {"warn": "WARNING"}.get(_level or "info", (_level or "info").upper())
    logging.basicConfig(level=getattr(logging, name, logging.INFO), stream=sys.stderr, format=_FORMAT)


class _Logger:
    """Stands for logging.getLogger(name) until first used, then forwards to it."""

    __slots__ = ("_name", "_real")

    def __init__(self, name: str) -> None:
        self._name = name
        self._real = None

    def __getattr__(self, attr: str) -> Any:   # debug, info, warning, exception, …
        real = self._real
        if real is None:
            import logging

            if _level is not None and not logging.getLogger().handlers:
                _apply()
            real = self._real = logging.getLogger(self._name)
        return getattr(real, attr)


def get_logger(name: str) -> Any:
    return _Logger(name)
