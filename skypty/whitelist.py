"""Whitelist stores behind one interface (pty.md §7.2).

`allowed(pk)` is what every transport asks; the host's own PK is always allowed and is not
listed. `list()` returns the stored keys in insertion (file) order. `add`/`remove` change the
store; a key that is already present (add) or absent (remove) raises `WhitelistError` with a
clear one-line message, after the other keys of the same call were applied. That message is
what a control-socket client sees as the RPC error string.

- `MemoryWhitelist`: `cli pty host` (union of --allow and the config's wl), or any host
  without a config file. Changes live as long as the process.
- `ConfigWhitelist`: the config file's `wl`. The file is re-read whenever its identity
  (device, inode, size, mtime) changes, so edits by hand or by another process take effect
  at the next connection; add/remove rewrite it atomically (0600), preserving its other keys.
  A config that cannot be read or parsed allows nobody but the host itself (fail closed).
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Iterable, List, Optional, Sequence, Tuple

from skypty.errors import SkyptyError
from skypty.keys import PubKey

__all__ = ["Whitelist", "MemoryWhitelist", "ConfigWhitelist", "WhitelistError", "open_whitelist"]

log = logging.getLogger(__name__)


class WhitelistError(SkyptyError):
    """A whitelist change that could not be (fully) applied; the text goes back to the client."""


def _as_pk(pk) -> PubKey:
    pk = pk if isinstance(pk, PubKey) else PubKey(bytes(pk))
    if pk.is_null():
        raise WhitelistError("invalid public key: the null key cannot be whitelisted")
    return pk


def _as_pks(pks: Iterable) -> List[PubKey]:
    out: List[PubKey] = []
    for pk in pks:
        pk = _as_pk(pk)
        if pk not in out:
            out.append(pk)
    return out


def _skipped_add(pks: Sequence[PubKey]) -> WhitelistError:
    # Upstream's text for the one-key case, so scripts matching it keep working.
    return WhitelistError("; ".join(f"skipping append for {pk.hex()}. Already exists" for pk in pks))


def _skipped_remove(pks: Sequence[PubKey]) -> WhitelistError:
    return WhitelistError("; ".join(f"skipping removal for {pk.hex()}. Not in whitelist" for pk in pks))


class Whitelist:
    """Interface: allowed(pk), list(), add(pks), remove(pks)."""

    def __init__(self, own_pk: Optional[PubKey]) -> None:
        self.own_pk = own_pk
        self._lock = threading.RLock()

    def allowed(self, pk) -> bool:
        if pk is None:
            return False
        if not isinstance(pk, PubKey):
            try:
                pk = PubKey(bytes(pk))
            except Exception:
                return False
        if pk.is_null():
            return False
        if self.own_pk is not None and pk == self.own_pk:
            return True
        return pk in self._keys()

    def list(self) -> List[PubKey]:
        return list(self._keys())

    def _keys(self) -> Sequence[PubKey]:  # pragma: no cover - abstract
        raise NotImplementedError

    def add(self, pks: Iterable) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def remove(self, pks: Iterable) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class MemoryWhitelist(Whitelist):
    def __init__(self, own_pk: Optional[PubKey], pks: Iterable = ()) -> None:
        super().__init__(own_pk)
        self._list: List[PubKey] = _as_pks(pks)

    def _keys(self) -> Sequence[PubKey]:
        with self._lock:
            return tuple(self._list)

    def add(self, pks: Iterable) -> None:
        pks = _as_pks(pks)
        with self._lock:
            existing = [pk for pk in pks if pk in self._list]
            self._list.extend(pk for pk in pks if pk not in existing)
        for pk in pks:
            if pk not in existing:
                log.info("whitelist: added %s", pk.hex())
        if existing:
            raise _skipped_add(existing)

    def remove(self, pks: Iterable) -> None:
        pks = _as_pks(pks)
        with self._lock:
            absent = [pk for pk in pks if pk not in self._list]
            self._list = [pk for pk in self._list if pk not in pks]
        for pk in pks:
            if pk not in absent:
                log.info("whitelist: removed %s", pk.hex())
        if absent:
            raise _skipped_remove(absent)


def _identity(path: str) -> Optional[Tuple[int, int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ConfigWhitelist(Whitelist):
    """The `wl` of a host config file; `extra` keys (from --wl flags) are allowed but never written."""

    def __init__(self, own_pk: Optional[PubKey], path: str, extra: Iterable = ()) -> None:
        super().__init__(own_pk)
        self.path = path
        self._extra = _as_pks(extra)
        self._ident: Optional[Tuple[int, int, int, int]] = None
        self._cached: Tuple[PubKey, ...] = ()
        self._bad_ident: object = object()
        self._keys()   # log a broken file at startup rather than at the first connection

    def _read_wl(self) -> List[PubKey]:
        from skypty.config import parse_wl, read_document

        doc, _ = read_document(self.path)
        return parse_wl(doc.get("wl"), self.path)

    def _keys(self) -> Sequence[PubKey]:
        with self._lock:
            ident = _identity(self.path)
            if ident is not None and ident == self._ident:
                return self._cached
            if ident is None:
                if self._bad_ident != "missing":
                    log.error("whitelist: %s is missing: allowing only the host's own key", self.path)
                    self._bad_ident = "missing"
                self._ident, self._cached = None, tuple(self._extra)
                return self._cached
            try:
                keys = self._read_wl()
            except SkyptyError as e:
                if self._bad_ident != ident:
                    log.error("whitelist: %s: allowing only the host's own key", e)
                    self._bad_ident = ident
                # Not cached under `ident`: a rewrite within the same mtime tick must be seen.
                return tuple(self._extra)
            self._bad_ident = None
            self._ident = ident
            self._cached = tuple(keys) + tuple(pk for pk in self._extra if pk not in keys)
            return self._cached

    def _update(self, fn) -> None:
        from skypty.config import parse_wl, rewrite_config

        def mutate(doc) -> None:
            current = parse_wl(doc.get("wl"), self.path)
            doc["wl"] = [pk.hex() for pk in fn(current)]

        try:
            rewrite_config(self.path, mutate)
        except WhitelistError:
            raise
        except SkyptyError as e:
            raise WhitelistError(f"cannot update the whitelist: {e}") from None
        except OSError as e:
            raise WhitelistError(f"cannot update the whitelist in {self.path}: {e.strerror or e}") from None
        self._ident = None   # re-read on the next check

    def add(self, pks: Iterable) -> None:
        pks = _as_pks(pks)
        existing: List[PubKey] = []

        def fn(current: List[PubKey]) -> List[PubKey]:
            existing.extend(pk for pk in pks if pk in current)
            new = [pk for pk in pks if pk not in current]
            if not new:
                raise _skipped_add(existing)   # nothing to write: leave the file alone
            return current + new

        with self._lock:
            self._update(fn)
        for pk in pks:
            if pk not in existing:
                log.info("whitelist: added %s to %s", pk.hex(), self.path)
        if existing:
            raise _skipped_add(existing)

    def remove(self, pks: Iterable) -> None:
        pks = _as_pks(pks)
        absent: List[PubKey] = []

        def fn(current: List[PubKey]) -> List[PubKey]:
            absent.extend(pk for pk in pks if pk not in current)
            if len(absent) == len(pks):
                if any(pk in self._extra for pk in absent):
                    raise WhitelistError("; ".join(
                        f"{pk.hex()} comes from --wl on the command line; restart the host without it"
                        for pk in absent if pk in self._extra))
                raise _skipped_remove(absent)
            return [pk for pk in current if pk not in pks]

        with self._lock:
            self._update(fn)
        for pk in pks:
            if pk not in absent:
                log.info("whitelist: removed %s from %s", pk.hex(), self.path)
        if absent:
            raise _skipped_remove(absent)


def open_whitelist(cfg, own_pk: Optional[PubKey] = None) -> Whitelist:
    """The store a host should use for a loaded HostConfig: the file when there is one."""
    if own_pk is None and cfg.sk is not None:
        own_pk = cfg.sk.pubkey()
    if cfg.path:
        return ConfigWhitelist(own_pk, cfg.path, extra=cfg.wl_extra)
    return MemoryWhitelist(own_pk, cfg.wl)
